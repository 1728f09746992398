"""Run under torchrun by tests/test_distributed.py: SoRA on a tiny llama sharded with FSDP2 (fully_shard).

Every rank also trains a plain (unsharded) copy of the same model on the whole global batch: the
single-process reference. Each rank dumps its gathered gates and its local gate shards; rank 0 exports
the FSDP2 model (after a full-state gather) and the reference to two adapter directories.
"""

import copy
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

import soralib
from conftest import sora_model
from soralib.budget import kept_cost, trim_model_

out = Path(sys.argv[1])
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
R, MIN_RANK, STEPS, PER_RANK = 5, 1, 3, 2  # r = 5 is sharded unevenly (3 + 2) over 2 ranks

reference = sora_model("llama", seed=0, r=R).train()
model = copy.deepcopy(reference)
fully_shard(model)
assert all(isinstance(g, DTensor) for g in soralib.gate_parameters(model)), "FSDP2 did not shard the gates"


def optimizer(m):  # a large threshold zeroes most gates, so min_rank binds in some modules
    return soralib.create_sora_optimizer(m, lr=1e-2, threshold=0.2, min_rank=MIN_RANK)


def train(m, opt, steps, shard):
    for step in steps:
        g = torch.Generator().manual_seed(100 + step)  # the global batch of a step, the same on every rank
        ids = torch.randint(1, 64, (PER_RANK * world, 9), generator=g)
        labels = torch.randint(0, 3, (PER_RANK * world,), generator=g)
        if shard:  # this rank's rows; FSDP2 averages the gradients over the ranks: the global mean
            ids, labels = ids[rank * PER_RANK:(rank + 1) * PER_RANK], labels[rank * PER_RANK:(rank + 1) * PER_RANK]
        torch.nn.functional.cross_entropy(m(input_ids=ids).logits, labels).backward()
        opt.step()
        opt.zero_grad()


def whole_gates(m):
    return [g.detach().full_tensor() if isinstance(g, DTensor) else g.detach().clone()
            for g in soralib.gate_parameters(m, trainable_only=False)]


costs = [layer.in_features + layer.out_features for layer in reference.modules() if isinstance(layer, soralib.SoraLayer)]
ref_opt, opt = optimizer(reference), optimizer(model)
train(reference, ref_opt, range(STEPS), shard=False)
train(model, opt, range(STEPS), shard=True)
dump = {"costs": costs, "prox": whole_gates(model), "reference_prox": whole_gates(reference)}

# A budget halfway between what min_rank forces and what is kept: the trim must rank across modules.
forced = sum(min(MIN_RANK, int((g != 0).sum())) * c for g, c in zip(dump["reference_prox"], costs))
budget = (forced + kept_cost(dump["reference_prox"], costs)) // 2
trim_model_(reference, budget, min_rank=MIN_RANK)
trim_model_(model, budget, min_rank=MIN_RANK)
dump.update(budget=budget, trim=whole_gates(model), reference_trim=whole_gates(reference))
train(reference, ref_opt, range(STEPS, STEPS + 1), shard=False)  # training goes on after a trim
train(model, opt, range(STEPS, STEPS + 1), shard=True)
dump.update(final=whole_gates(model), reference_final=whole_gates(reference),
            local=[g.to_local().detach().clone() for g in soralib.gate_parameters(model, trainable_only=False)],
            # counts of sharded gates (a collective: every rank calls them)
            report=soralib.sparsity_report(model), reference_report=soralib.sparsity_report(reference),
            kept_cost=kept_cost(soralib.gate_parameters(model), costs))
try:
    soralib.export_lora(model, out / f"sharded-export-rank{rank}")
except ValueError as err:
    dump["sharded_export_error"] = str(err)
torch.save(dump, out / f"gates-rank{rank}.pt")

# The export: gather the full state to rank 0's CPU, load it into an unsharded model, export that.
state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
if rank == 0:
    plain = sora_model("llama", seed=1, r=R)  # another init: every value must come from the gathered state
    plain.load_state_dict(state)
    soralib.export_lora(plain, out / "fsdp2-adapter")
    soralib.export_lora(reference, out / "single-adapter")
dist.barrier()
dist.destroy_process_group()
