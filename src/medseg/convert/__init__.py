"""The convert stage, one module per job: `dataset` (the stage: every case, the manifest,
the atomic output), `case` (one case, in a worker process), `ids` (case ids and their checks),
`pseudonyms` (keyed-hash ids, the key file, messages without names)."""

from medseg.convert.case import MANIFEST_COLUMNS
from medseg.convert.dataset import SKIPPED_COLUMNS, convert_dataset
from medseg.convert.pseudonyms import ID_KEY_ENV, ID_KEY_FILE, find_sources, id_key, key_fingerprint

__all__ = [
    "ID_KEY_ENV",
    "ID_KEY_FILE",
    "MANIFEST_COLUMNS",
    "SKIPPED_COLUMNS",
    "convert_dataset",
    "find_sources",
    "id_key",
    "key_fingerprint",
]
