"""`celebahq256`: a TFDS dataset built from a local folder of CelebA-HQ 256x256 images.

Put the images (*.jpg / *.jpeg / *.png, any sub-folders) in
`<data_dir>/downloads/manual/celebahq256/` (or directly in a folder passed as `--manual_dir`)
and run `python -m shortcut.data.prepare celebahq256 --data_dir <data_dir>`.
Images that are not 256x256 RGB are converted (RGB) and resized (PIL bicubic, antialiased).
"""

from __future__ import annotations

import io
from pathlib import Path

from shortcut.data.tfenv import tfds

IMAGE_SIZE = 256
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
MANUAL_SUBDIR = "celebahq256"


def image_folder(manual_dir: str | Path) -> Path:
    """The folder holding the images: `manual_dir/celebahq256` if it exists, else `manual_dir`."""
    manual_dir = Path(manual_dir)
    sub = manual_dir / MANUAL_SUBDIR
    return sub if sub.is_dir() else manual_dir


def check_files(manual_dir: str | Path) -> None:
    """Raise DatasetNotReadyError, saying where the images go, when `manual_dir` holds none."""
    from shortcut.data.errors import DatasetNotReadyError

    if not list_images(image_folder(manual_dir)):
        raise DatasetNotReadyError(f"No *.jpg / *.png images under {manual_dir}: put the CelebA-HQ 256x256 images "
                                   f"(30,000 files) in {Path(manual_dir) / MANUAL_SUBDIR}, or pass --manual_dir "
                                   "/path/to/image/folder")


def list_images(folder: str | Path) -> list[Path]:
    """Image files under `folder` (recursive, sorted); [] when the folder does not exist."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


class CelebaHq256(tfds.core.GeneratorBasedBuilder):
    """CelebA-HQ at 256x256 from a manual folder of images; unconditional, one `train` split."""

    name = "celebahq256"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Images from a local folder."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = f"""
    Place the CelebA-HQ 256x256 images (*.jpg or *.png, 30,000 files) in
    `<manual_dir>/{MANUAL_SUBDIR}/` or directly in `<manual_dir>/`
    (default manual_dir: <data_dir>/downloads/manual).
    """

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description="CelebA-HQ faces at 256x256 (Karras et al. 2018), from a local folder.",
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(
                        shape=(IMAGE_SIZE, IMAGE_SIZE, 3), encoding_format="png"
                    ),
                    "file_name": tfds.features.Text(),
                }
            ),
            homepage="https://github.com/tkarras/progressive_growing_of_gans",
        )

    def _split_generators(self, dl_manager):
        folder = image_folder(dl_manager.manual_dir)
        files = list_images(folder)
        if not files:
            raise FileNotFoundError(f"No *.jpg / *.png images under {folder}")
        return {"train": self._generate_examples(folder, files)}

    def _generate_examples(self, folder: Path, files: list[Path]):
        from PIL import Image

        for path in files:
            raw = path.read_bytes()
            with Image.open(io.BytesIO(raw)) as im:
                ok = im.mode == "RGB" and im.size == (IMAGE_SIZE, IMAGE_SIZE)
                if not ok or im.format not in ("JPEG", "PNG"):
                    im = im.convert("RGB")
                    if im.size != (IMAGE_SIZE, IMAGE_SIZE):
                        im = im.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BICUBIC, reducing_gap=None)
                    buf = io.BytesIO()
                    im.save(buf, format="PNG")
                    raw = buf.getvalue()
            # Already-encoded JPEG/PNG bytes are stored as they are (no re-encoding loss).
            key = path.relative_to(folder).as_posix()
            yield key, {"image": raw, "file_name": key}
