"""A local Cloud Storage server for tests: gcp-storage-emulator (in memory) on 127.0.0.1,
plus the `x-goog-generation` header that real GCS sends with every object download and the
emulator leaves out. tensorstore (Orbax's OCDBT checkpoints) reads that header to know which
version of a file it read; without it, the second write into a checkpoint fails with
"Malformed StorageGeneration".

    python -m tests.gcs_server PORT BUCKET
"""
import sys

from gcp_storage_emulator.handlers import objects

_download = objects.download


def _download_with_generation(request, response, storage, *args, **kwargs):
    _download(request, response, storage, *args, **kwargs)
    try:
        obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
    except Exception:  # not found: the handler has set the status
        return
    if obj.get("generation"):
        response["x-goog-generation"] = str(obj["generation"])
        response["x-goog-metageneration"] = str(obj.get("metageneration") or 1)


objects.download = _download_with_generation  # before the server module binds its routes

from gcp_storage_emulator.server import create_server  # noqa: E402


def main(port: str, bucket: str) -> None:
    create_server("127.0.0.1", int(port), in_memory=True, default_bucket=bucket).run()  # until killed


if __name__ == "__main__":
    main(*sys.argv[1:])
