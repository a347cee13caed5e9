from pathlib import Path

from benchmarks.report import write_section


def test_sections_are_replaced_in_place_and_others_kept(tmp_path: Path) -> None:
    doc = tmp_path / "benchmarks.md"
    write_section("cpu", "cpu v1", doc)
    write_section("gpu", "gpu v1", doc)
    write_section("cpu", "cpu v2", doc)
    text = doc.read_text()
    assert text.startswith("# Benchmarks")
    assert "cpu v2" in text and "cpu v1" not in text and "gpu v1" in text
    assert text.index("cpu v2") < text.index("gpu v1")
