"""Object store for encrypted artifact objects: a local folder or any S3-compatible bucket.

Objects can be many GB, so writes stream through an ObjectWriter and reads yield ~1 MiB chunks;
nothing here holds a whole object in memory. Failures a retry may cure (endpoint down, timeouts,
5xx, throttling, a full disk) raise StorageUnavailable, which callers turn into HTTP 503; every
other backend failure is a plain StorageError.

base.py holds the contract, the errors and get_object_store(); fs.py and s3.py the backends.
"""

from registry.storage.base import (
    CHUNK_SIZE,
    MAX_KEY_LENGTH,
    ChunkStream,
    ObjectExists,
    ObjectNotFound,
    ObjectStore,
    ObjectWriter,
    StorageError,
    StorageUnavailable,
    get_object_store,
    validate_key,
)
from registry.storage.fs import FileSystemStore
from registry.storage.s3 import (
    DEFAULT_PART_SIZE,
    S3_MAX_PART_SIZE,
    S3_MAX_PARTS,
    S3_MIN_PART_SIZE,
    S3Store,
    s3_config,
)

__all__ = [
    "CHUNK_SIZE",
    "DEFAULT_PART_SIZE",
    "MAX_KEY_LENGTH",
    "S3_MAX_PARTS",
    "S3_MAX_PART_SIZE",
    "S3_MIN_PART_SIZE",
    "ChunkStream",
    "FileSystemStore",
    "ObjectExists",
    "ObjectNotFound",
    "ObjectStore",
    "ObjectWriter",
    "S3Store",
    "StorageError",
    "StorageUnavailable",
    "get_object_store",
    "s3_config",
    "validate_key",
]
