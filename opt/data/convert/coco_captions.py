"""COCO captions (and Flickr30k in the same format) -> one image-text sample per caption.

Input: the COCO caption JSON (``captions_train2017.json`` ...)::

    {"images": [{"id": 391895, "file_name": "COCO_val2014_000000391895.jpg", ...}, ...],
     "annotations": [{"id": 770337, "image_id": 391895, "caption": "A man with a red helmet ..."}, ...]}

``file_name`` is relative to the images folder. Each annotation is one sample
(see :mod:`.captions`): the image (original bytes when valid), the caption and
metadata ``{"group": "<prefix>:<image id>", "image_id", "file_name",
"caption_index", "annotation_id", "source": "coco-captions", ...}``, where
``caption_index`` is the annotation's position among those of its image. Samples
follow the order of ``images``, the captions of an image in annotation order;
annotations that give no sample come last:

* ``row_invalid``: an annotation that is not an object, or without a string
  ``caption`` and an integer or string ``image_id``; one whose image entry has no
  string ``file_name``.
* ``image_unknown``: an ``image_id`` that no entry of ``images`` has (the first
  entry of an id counts; entries without an id cannot be named and are ignored).
* ``caption_empty``, and the image skips of :mod:`.media` (``image_missing``,
  ``path_escapes`` ...), counted once per caption of that image.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from opt.data.convert.captions import CaptionConverter, Media, caption_row, convert_captions, skipped_row
from opt.data.convert.common import input_file, input_folder
from opt.data.convert.media import inside, read_image
from opt.errors import UserError


@dataclass(kw_only=True)
class CocoCaptions(CaptionConverter):
    """Converter of one COCO caption row (see the module docstring)."""

    images: Path
    source = "coco-captions"

    def locate(self, row: dict) -> Path:
        return inside(self.images, row["media"])

    def read(self, path: Path) -> Media:
        extension, payload, meta = read_image(path)
        return {extension: payload}, meta, []


def _is_id(value: object) -> bool:
    return isinstance(value, int | str) and not isinstance(value, bool)


def coco_caption_rows(document: object) -> Iterator[dict]:
    """The caption rows of a parsed COCO caption file, grouped by image (see the module docstring)."""
    if not (isinstance(document, dict) and isinstance(document.get("images"), list)
            and isinstance(document.get("annotations"), list)):
        raise UserError("--annotations: not a COCO caption file (an object with 'images' and 'annotations' lists)")
    file_names: dict[int | str, object] = {}
    for image in document["images"]:
        if isinstance(image, dict) and _is_id(image.get("id")):
            file_names.setdefault(image["id"], image.get("file_name"))
    by_image: dict[int | str, list[tuple[int, dict]]] = {image_id: [] for image_id in file_names}
    unusable = []
    for index, annotation in enumerate(document["annotations"]):
        origin = f"annotations[{index}]"
        if not (isinstance(annotation, dict) and isinstance(annotation.get("caption"), str)
                and _is_id(annotation.get("image_id"))):
            unusable.append(skipped_row("row_invalid", "not an object with a caption and an image_id", origin))
        elif annotation["image_id"] not in file_names:
            unusable.append(skipped_row("image_unknown", f"image_id {annotation['image_id']!r}", origin))
        elif not isinstance(file_names[annotation["image_id"]], str):
            unusable.append(skipped_row("row_invalid", f"image {annotation['image_id']!r} has no file_name", origin))
        else:
            by_image[annotation["image_id"]].append((index, annotation))
    for image_id, annotations in by_image.items():
        for caption_index, (index, annotation) in enumerate(annotations):
            fields = {"image_id": image_id, "file_name": file_names[image_id], "annotation_id": annotation.get("id")}
            yield caption_row(group=str(image_id), media=file_names[image_id], caption=annotation["caption"],
                              caption_index=caption_index, origin=f"annotations[{index}]", fields=fields)
    yield from unusable


def convert_coco_captions(annotations: str | Path, *, images: str | Path, out: str | Path, prefix: str = "train",
                          shard_size: int = 1000, workers: int = 1, progress: bool = True) -> dict:
    """Convert a COCO caption file into ``out``, one sample per caption; returns the summary
    (see :mod:`opt.data.convert.common`)."""
    annotations = input_file(annotations, "--annotations")
    converter = CocoCaptions(prefix=prefix, images=input_folder(images, "--images"))
    try:
        document = json.loads(annotations.read_bytes())
    except (UnicodeDecodeError, ValueError) as error:
        raise UserError(f"--annotations: {annotations.name} is not valid JSON ({type(error).__name__})") from None
    return convert_captions(converter, coco_caption_rows(document), name="coco-captions", source=annotations,
                            out=out, prefix=prefix, shard_size=shard_size, workers=workers, options={},
                            progress=progress)
