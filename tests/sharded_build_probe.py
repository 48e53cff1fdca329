"""Run under ``torchrun --nproc_per_node 2``: build a MIM sharded over a CPU (gloo) mesh, as
``ModelParallelStrategy`` does, and save what rank 0 gathers back, for the test to compare with an
eagerly built MIM.

    torchrun --nproc_per_node 2 tests/sharded_build_probe.py OUT.pt '{"llm": {"preset": "tiny"}}'
"""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist


def main() -> None:
    out, settings = sys.argv[1], json.loads(sys.argv[2])
    dist.init_process_group("gloo")
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh

    from heads import LanguageDescriptionHead
    from mim.modeling.mim_model import MIM

    torch.manual_seed(0)
    model = MIM(LanguageDescriptionHead(), blip2="tiny", stage="instruction", lazy=True, **settings)
    model._device_mesh = init_device_mesh("cpu", (dist.get_world_size(),), mesh_dim_names=("data_parallel",))
    model.configure_model()
    local_shapes = {name: tuple(p.to_local().shape) for name, p in model.llm.named_parameters()
                    if hasattr(p, "to_local")}
    with model.full_state():
        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    # one forward on the sharded model: the test repeats it on the eager one
    batch = torch.load(sys.argv[3], weights_only=True) if len(sys.argv) > 3 else None
    with torch.no_grad():  # eval: no dropout, as the test's whole model
        logits = model.eval()(batch).logits.detach() if batch is not None else None
    if dist.get_rank() == 0:
        torch.save({"state": state, "local_shapes": local_shapes, "logits": logits,
                    "world_size": dist.get_world_size()}, out)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
