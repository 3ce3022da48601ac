"""Uncompressed, memory-mapped copies of the record datasets that training windows read.

Records are stored compactly (gzip-compressed float16 chunks of 128 ms): a 400-ms training window of one
simulation decompresses ~5 chunks of each voltage/current dataset, ~25 ms of CPU per window, a third of a
training step of the bundled design on one core. :class:`DecompressedCache` decompresses each dataset a
window needs once, into ``.npy`` files under a cache folder, and serves memory-mapped arrays from then on:
a window becomes a strided copy out of the page cache.

Each record gets its own sub-folder, keyed by the record's absolute path, size and modification time, so a
record that is rewritten gets a fresh copy (stale ones are left behind: delete the folder to reclaim the
space; ~15 MB per simulated second for voltages and currents). Files are written to a temporary name and
renamed, so concurrent processes (DataLoader workers, several trainings) can share one folder. The values
are the record's, bit for bit, in the record's dtype.
"""
from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from pathlib import Path

import h5py
import numpy as np

__all__ = ["DecompressedCache"]

_MAX_OPEN_RECORDS = 256


class DecompressedCache:
    """Memory-mapped, uncompressed copies of datasets of HDF5 records, built on first use.

    Parameters
    ----------
    folder : str or Path
        Where the copies live (created if missing).
    """

    def __init__(self, folder):
        self.folder = Path(folder)
        self._open: OrderedDict = OrderedDict()

    def _record_dir(self, path: Path) -> Path:
        st = path.stat()
        key = hashlib.sha1(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:20]
        return self.folder / f"{path.stem}-{key}"

    def arrays(self, path, names) -> dict:
        """``{name: read-only memory-mapped ndarray}`` of the datasets ``names`` (HDF5 paths such as
        ``"v_1ms"`` or ``"input_effective/t_ms"``) of the record at ``path``, decompressed on first use."""
        path = Path(path)
        names = tuple(names)
        hit = self._open.get((path, names))
        if hit is not None:
            self._open.move_to_end((path, names))
            return hit
        where = self._record_dir(path)
        files = {n: where / (n.replace("/", "__") + ".npy") for n in names}
        missing = [n for n, f in files.items() if not f.exists()]
        if missing:
            where.mkdir(parents=True, exist_ok=True)
            with h5py.File(path, "r") as h5:
                for n in missing:
                    tmp = files[n].with_name(f".{files[n].name}.{os.getpid()}.tmp")
                    with open(tmp, "wb") as fh:
                        np.save(fh, h5[n][()])
                    os.replace(tmp, files[n])
        out = {n: np.load(f, mmap_mode="r") for n, f in files.items()}
        self._open[(path, names)] = out
        if len(self._open) > _MAX_OPEN_RECORDS:
            self._open.popitem(last=False)
        return out
