"""A labelled test folder (MVTec layout: good/*, <defect>/*) as the frames a replay sends."""

from dataclasses import dataclass
from pathlib import Path

from edge.replay import IMAGE_SUFFIXES
from protocols.messages import Result

GOOD_FOLDER = "good"  # every other folder holds one defect type


@dataclass(frozen=True)
class Sample:
    path: Path
    name: str    # relative to the images folder, e.g. colour/00.jpg
    truth: str   # its folder: `good` or the defect type

    @property
    def defective(self) -> bool:
        return self.truth != GOOD_FOLDER

    @property
    def overlay_name(self) -> str:
        """colour/00.jpg → colour_00.png: flat, as names repeat across folders."""
        return Path(self.name).with_suffix(".png").as_posix().replace("/", "_")

    def judged_right(self, result: Result) -> bool:
        return (result.verdict == "fail") == self.defective


def list_samples(images: Path, limit: int | None = None) -> list[Sample]:
    """The images in the order edge.replay sends them (recursive, sorted by path): frame n is
    samples[n]."""
    paths = sorted(p for p in images.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    return [Sample(p, p.relative_to(images).as_posix(), p.parent.name) for p in paths[:limit]]
