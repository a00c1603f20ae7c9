"""What loading pretrained weights did, tensor by tensor, so that nothing is dropped silently."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class LoadReport:
    """Which tensors of one part came from a pretrained checkpoint.

    ``loaded``: copied as they are; ``resampled``: copied after resampling (position
    embeddings on another grid); ``fresh``: the part's tensors the checkpoint had nothing
    for (initialised as a model built from scratch); ``unused``: the checkpoint's tensors
    the part has no place for (a classifier head, a class token the config leaves out).
    """

    part: str  # "image", "text" or "audio"
    source: str  # the file or directory read
    loaded: list[str] = field(default_factory=list)
    resampled: list[str] = field(default_factory=list)
    fresh: list[str] = field(default_factory=list)
    unused: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """One line: counts, with the first few names of what was resampled, left fresh or unused."""
        def some(names: list[str]) -> str:
            shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
            return f" ({shown})" if names else ""

        return (f"{self.part}: {len(self.loaded) + len(self.resampled)} tensors from {self.source}: "
                f"{len(self.loaded)} loaded, {len(self.resampled)} resampled{some(self.resampled)}, "
                f"{len(self.fresh)} fresh{some(self.fresh)}, {len(self.unused)} unused{some(self.unused)}")
