"""Two MPI ranks build a HayL5PC at the same moment from a freshly emptied mechanism cache.

Both ranks call ``mechanisms.load()`` (through ``HayL5PC``) while the cache is empty: one must
compile, the other wait on the lock, and both must then load the same finished build and simulate
the same cell. Real ``mpiexec -n 2`` (pip mpich), real nrnivmodl, real NEURON.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

SCRIPT = textwrap.dedent("""
    import lfdeep_neuron
    from lfdeep_neuron.parallel import parallel_context
    pc = parallel_context()
    pc.barrier()                      # both ranks reach the empty cache together
    from lfdeep_neuron import mechanisms
    from lfdeep_neuron.hay import HayL5PC, run_cell
    cell = HayL5PC(synapses=False)
    cell.add_iclamp(2.0, 1.0, 10.0)
    out = run_cell(cell, 15)
    print(f"RANK {int(pc.id())} OF {int(pc.nhost())} SEGMENTS {len(cell.segments)} "
          f"BUILD {mechanisms.load()} VSOMA {out['v_1ms'][0, -1]:.6f} SPIKES {len(out['soma_spike_times_ms'])}",
          flush=True)
    pc.barrier()
    pc.done()
""")


def test_two_ranks_build_hay_cell_from_empty_cache(tmp_path, morphology):
    mpiexec = Path(sys.executable).parent / "mpiexec"
    if not mpiexec.exists():
        pytest.skip(f"mpiexec not found next to {sys.executable} (pip install mpich)")
    cache = tmp_path / "cache"
    assert not cache.exists()
    script = tmp_path / "two_ranks.py"
    script.write_text(SCRIPT)
    env = dict(os.environ, LFDEEP_CACHE_DIR=str(cache), LFDEEP_HAY_MORPHOLOGY=str(morphology),
               OMP_NUM_THREADS="1")
    proc = subprocess.run([str(mpiexec), "-n", "2", sys.executable, str(script)], env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = re.findall(r"RANK (\d) OF (\d) SEGMENTS (\d+) BUILD (\S+) VSOMA (\S+) SPIKES (\d+)", proc.stdout)
    assert sorted(int(r[0]) for r in lines) == [0, 1], proc.stdout
    assert all(r[1] == "2" and r[2] == "642" for r in lines)
    assert lines[0][3] == lines[1][3]                       # the same build directory
    assert lines[0][4] == lines[1][4] and lines[0][5] == lines[1][5]  # the same cell
    assert int(lines[0][5]) >= 1                            # 2 nA for 10 ms fires the soma
    builds = [p for p in (cache / "mechanisms").iterdir() if p.is_dir()]
    assert [p.name for p in builds] == [Path(lines[0][3]).name], builds   # one build, no leftovers
