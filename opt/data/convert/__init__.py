"""Real corpora to shards: Localized Narratives triplets, caption benchmarks and generic manifests.

:mod:`.rows` numbers the input rows and plans them into shards, :mod:`.media`
reads and verifies the files a row names, :mod:`.common` writes the shards in
parallel and resumably and keeps the counted-skip summary; the converters are
:mod:`.localized_narratives`, :mod:`.coco_captions` and :mod:`.audio_captions` (one
sample per caption, grouped by medium: :mod:`.captions`) and :mod:`.manifest`.
"""

from opt.data.convert.audio_captions import convert_audio_captions
from opt.data.convert.coco_captions import convert_coco_captions
from opt.data.convert.localized_narratives import convert_localized_narratives
from opt.data.convert.manifest import convert_manifest

__all__ = ["convert_audio_captions", "convert_coco_captions", "convert_localized_narratives", "convert_manifest"]
