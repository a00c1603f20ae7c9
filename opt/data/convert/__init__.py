"""Real corpora to shards: Localized Narratives triplets and generic manifests.

:mod:`.rows` numbers the input rows and plans them into shards, :mod:`.media`
reads and verifies the files a row names, :mod:`.common` writes the shards in
parallel and resumably and keeps the counted-skip summary; the converters are
:mod:`.localized_narratives` and :mod:`.manifest`.
"""

from opt.data.convert.localized_narratives import convert_localized_narratives
from opt.data.convert.manifest import convert_manifest

__all__ = ["convert_localized_narratives", "convert_manifest"]
