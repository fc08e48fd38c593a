"""An adapter kind's frozen state from calibration statistics (NoRA's outer pairs, JACTUS'
factors): computed once for a new run, saved with it as :data:`FROZEN_FILE`, read back on rebuild."""

from __future__ import annotations

from pathlib import Path

import torch

from supernet import runfiles as runio
from supernet.errors import SupernetError

FROZEN_FILE = "adapter_frozen.safetensors"


def calibrate_adapters(net, batches, run_dir: str | Path | None,
                       progress: bool = False) -> dict[str, torch.Tensor] | None:
    """The frozen state of an adapter kind that calibrates (NoRA's outer pairs, JACTUS' factors): from the
    calibration batches for a new run, read from the run's :data:`FROZEN_FILE` for a recorded one
    (calibration depends on floating-point reduction order, as the masks do). None for other kinds."""
    needed = {n: a for n, a in net.adapters.items() if a.calibration}
    if not needed:
        return None
    if run_dir is not None:
        path = Path(run_dir) / FROZEN_FILE
        if not path.is_file():
            raise SupernetError(f"{path} is missing: the run's {net.config.adapter} adapters cannot be rebuilt "
                                "without it")
        net.load_frozen_state(runio.load_tensors(path))
    else:
        from supernet.compress.calibration import layer_statistics

        for kind in {type(a) for a in needed.values()}:
            kind.check_calibration({n: a for n, a in needed.items() if type(a) is kind}, net.config, net.model)
        wanted = sorted({s for a in needed.values() for s in a.calibration})
        home = next(net.model.parameters()).device
        device = torch.device("cuda") if torch.cuda.is_available() else home  # as Wanda's calibration
        net.model.to(device)
        try:
            moved = [{k: v.to(device) for k, v in b.items()} for b in batches()]
            stats = layer_statistics(net.model, needed, moved, wanted, progress=progress)
        finally:
            net.model.to(home)
        for s in stats.values():  # the adapters compute on their own device
            for field in ("input_sq_norms", "input_cov", "grad_cov"):
                if getattr(s, field) is not None:
                    setattr(s, field, getattr(s, field).to(home))
        for n, adapter in needed.items():
            adapter.calibrate(stats[n])
        for kind in {type(a) for a in needed.values()}:
            kind.finish_calibration({n: a for n, a in needed.items() if type(a) is kind}, net.config)
        net._costs.clear()
    return net.frozen_state_dict()
