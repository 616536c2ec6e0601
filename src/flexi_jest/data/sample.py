"""The unit every generator yields and every shard writer takes."""

from dataclasses import dataclass, field
from typing import Any

from PIL import Image


@dataclass
class Sample:
    """One image-caption pair.

    key:     unique within a dataset, [a-z0-9-] only (it becomes the tar member stem), e.g. "shapes-pool-00001234"
    image:   RGB PIL image, square, the split's image size
    caption: the paired text
    meta:    JSON-serialisable provenance: dataset, split, source, label (class name, eval splits), noise kind, ...
    """

    key: str
    image: Image.Image
    caption: str
    meta: dict[str, Any] = field(default_factory=dict)
