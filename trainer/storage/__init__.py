"""Where checkpoints (and data shards) live: local directories and object-store prefixes behind one
`Location` interface (location.py), over the object-store clients (objectstore.py). Framework-free."""
from trainer.storage.location import (MANIFEST, LocalDir, Location, StoreDir, is_remote, location, recover_aside,
                                      storage_errors)
from trainer.storage.objectstore import RemoteError, forget_stores

__all__ = ["MANIFEST", "LocalDir", "Location", "StoreDir", "RemoteError", "forget_stores", "is_remote", "location",
           "recover_aside", "storage_errors"]
