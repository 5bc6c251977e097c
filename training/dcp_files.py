"""A sharded checkpoint's files (torch.distributed.checkpoint), read without running code from them.

torch.distributed.checkpoint reads its .metadata with pickle.load, and the non-tensor items of its shards (the
optimizer's hyperparameters) with torch.load(weights_only=False): a checkpoint folder edited to hold a pickle that
calls os.system would run it on --resume. Here the metadata is unpickled by a restricted unpickler that builds the
classes torch writes there and nothing else, and every item of a shard loads with weights_only=True.

    read_metadata(folder)       the Metadata of a sharded checkpoint, or pickle.UnpicklingError
    load(state_dict, folder)    dcp.load with both: what train.py uses to resume a sharded run
"""

import io
import pickle

import torch

# What torch.distributed.checkpoint's .metadata holds (its Metadata and the dataclasses inside it): tested on
# checkpoints of FSDP2 runs with AdamW. Anything else in that file is refused, never built.
METADATA_CLASSES = {
    ("torch.distributed.checkpoint.metadata", name)
    for name in (
        "Metadata",
        "MetadataIndex",
        "StorageMeta",
        "TensorProperties",
        "TensorStorageMetadata",
        "BytesStorageMetadata",
        "ChunkStorageMetadata",
        "_MEM_FORMAT_ENCODING",
    )
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch.serialization", "_get_layout"),  # a torch.layout by its name
    ("torch", "Size"),
    ("pathlib", "PosixPath"),  # the checkpoint's path, as it was written
    ("collections", "OrderedDict"),
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in METADATA_CLASSES or (
            module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        ):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not what torch.distributed.checkpoint writes in .metadata")


def read_metadata(folder):
    """The Metadata in folder/.metadata, built from the checkpoint's own classes alone."""
    from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

    with open(f"{folder}/.metadata", "rb") as file:
        metadata = _MetadataUnpickler(file).load()
    if not isinstance(metadata, Metadata):
        raise pickle.UnpicklingError(f".metadata holds a {type(metadata).__name__}, not a Metadata")
    for item in (metadata.storage_data or {}).values():  # each shard a file of the folder itself
        path = getattr(item, "relative_path", None)
        if not isinstance(path, str) or "/" in path or path in ("", ".", ".."):
            raise pickle.UnpicklingError(f".metadata names a shard {path!r} outside its folder")
    if getattr(metadata, "storage_meta", None) is None:
        metadata.storage_meta = StorageMeta()  # as torch's own reader fills it in
    return metadata


def load(state_dict, folder):
    """torch.distributed.checkpoint.load(state_dict, checkpoint_id=folder), with the metadata read by
    read_metadata and every non-tensor item loaded with weights_only=True."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader

    class Reader(FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            metadata = read_metadata(self.path)
            metadata.storage_meta.load_id = self.load_id
            return metadata

    class Planner(DefaultLoadPlanner):
        def load_bytes(self, read_item, value):
            item = torch.load(io.BytesIO(value.read()), weights_only=True)
            if self.flatten_state_dict:
                from torch.distributed.checkpoint._traverse import set_element

                set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], item)
            else:
                self.state_dict[read_item.dest_index.fqn] = item

    dcp.load(state_dict, storage_reader=Reader(folder), planner=Planner())
