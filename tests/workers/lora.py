"""2-rank worker of tests/test_lora.py, run by `conftest.torchrun`: the LoRA model saved in argv[1]/model.pt
on tp=2 (with and without activation checkpointing) and on FSDP2 dp=2 (fp32, and a bf16 base with fp32
adapters); rank 0 writes logits, loss and full adapter gradients of each layout to argv[1]/res.pt."""

import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.tensor.debug import CommDebugMode

from llama.env import init_distributed
from llama.lora import apply_lora, is_lora_key, load_lora_state_dict, lora_state_dict, merge_lora
from llama.parallel import apply_ac, apply_fsdp, apply_tp, build_mesh
from tests.helpers import LORA_TARGETS, lora_base_model
from tests.workers import finish


def full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def build(sd, dtype=torch.float32):
    """The saved model: base loaded, then (after the caller's apply_tp) adapters."""
    model = lora_base_model().to(dtype)
    model.load_state_dict({k: v for k, v in sd.items() if not is_lora_key(k)}, strict=True)
    return model


def add_adapters(model, sd):
    apply_lora(model, r=4, alpha=8, dropout=0.0, targets=LORA_TARGETS)
    load_lora_state_dict(model, {k: v for k, v in sd.items() if is_lora_key(k)})
    return model


def step(model, tokens):
    """(logits, loss, adapter grads): loss over `tokens`' rows, averaged over ranks when dp > 1."""
    logits = model(tokens)
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), tokens[:, 1:].flatten())
    loss.backward()
    grads = {k: full(p.grad).clone() for k, p in model.named_parameters() if p.grad is not None}
    return logits.detach(), loss.detach(), grads


def main(work):
    torch.set_num_threads(1)
    rank = init_distributed("cpu").rank
    work = Path(work)
    sd = torch.load(work / "model.pt", weights_only=True)
    tokens = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(123))
    res = {"tokens": tokens}

    tp_mesh = build_mesh(1, 2, "cpu")["tp"]
    # collectives of one forward, base alone and with adapters: LoRA must add none
    for name in ("base", "lora"):
        model = apply_tp(build(sd), tp_mesh)
        if name == "lora":
            add_adapters(model, sd)
        with torch.no_grad(), CommDebugMode() as comm:
            model(tokens)
        res[f"comms_{name}"] = comm.get_total_counts()
    res["placements"] = {k: str(tuple(p.placements)) for k, p in model.named_parameters()
                         if k.startswith(("layers.0.attention.wq", "layers.0.attention.wo"))}
    for name, ac in (("tp2", "none"), ("tp2_ac", "selective")):
        model = add_adapters(apply_tp(build(sd), tp_mesh), sd)
        apply_ac(model, ac)
        logits, loss, grads = step(model, tokens)
        res[name] = {"logits": logits, "loss": loss.item(), "grads": grads}
    res["tp2_adapters"] = {k: full(v) for k, v in lora_state_dict(model).items()}
    merge_lora(model)
    res["tp2_merged"] = {k: full(v) for k, v in model.state_dict().items()}

    dp_mesh = build_mesh(2, 1, "cpu")["dp"]
    for name, dtype in (("dp2", torch.float32), ("dp2_bf16", torch.bfloat16)):
        model = apply_fsdp(add_adapters(build(sd, dtype), sd), dp_mesh)
        logits, loss, grads = step(model, tokens[rank:rank + 1])  # one row per rank
        dist.all_reduce(loss, op=dist.ReduceOp.AVG)
        gathered = [torch.empty_like(logits) for _ in range(2)]
        dist.all_gather(gathered, logits)
        res[name] = {"logits": torch.cat(gathered), "loss": loss.item(), "grads": grads}
    if rank == 0:
        torch.save(res, work / "res.pt")
    finish()


if __name__ == "__main__":
    main(sys.argv[1])
