"""Decoding strategies: how `Llama` runs the model for each step of generation.

A decoder is called as `decoder(tokens, start_pos, cache, last_only)` with (B, T) ids at positions
start_pos.. and returns float logits, (B, T, vocab) or (B, 1, vocab) with `last_only`, writing the
KV cache. All of them run the one `Transformer.forward`; they differ in how:
    eager     the model's forward as it is (any device, any number of ranks)
    compiled  one-token steps through torch.compile of the same forward with tensor positions
              (fixed shapes: one graph for every position; prefill stays eager); greedy decoding
              compiles the whole step (model, argmax, bookkeeping), on CUDA as one CUDA graph,
              with its one-row products and its attention on Triton kernels (llama/gpu_kernels.py)
    fused     one-token steps in one C++ call on x86 CPUs with AVX-512 (BF16) or AVX2+FMA, and ARM64 with
              NEON (llama/inference/cpu_decode.py, one source built per instruction set); bf16/fp32
              weights, or int8 ones (llama.quantize)
`Llama.build` picks one once, for the machine and the model.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from llama.gpu_kernels import INTERPRET, OneRowLinears, OneTokenAttention, available as gemv_available
from llama.model import KVCache, Transformer
from llama.quantize import Int8Linear, int8_linear

DECODERS = ("auto", "eager", "compiled", "fused")


class DecodeState:
    """What generating a batch keeps on the device, (B, width) with width >= the longest row:
    `tokens` prompt then generated ids (-1 beyond), `in_prompt` where tokens came from a prompt,
    `done` rows finished, `ends` each row's last position + 1, `cur` (1,) the position to produce."""

    def __init__(self, batch: int, width: int, device):
        self.tokens = torch.full((batch, width), -1, dtype=torch.long, device=device)
        self.in_prompt = torch.zeros(batch, width, dtype=torch.bool, device=device)
        self.done = torch.zeros(batch, dtype=torch.bool, device=device)
        self.ends = torch.zeros(batch, dtype=torch.long, device=device)
        self.cur = torch.zeros(1, dtype=torch.long, device=device)

    def start(self, prompt_tokens: list[list[int]], ends: list[int]) -> None:
        """Reset for new prompts, in place (the addresses stay: a CUDA graph may read them)."""
        self.tokens.fill_(-1)
        for i, t in enumerate(prompt_tokens):
            self.tokens[i, :len(t)] = torch.tensor(t, dtype=torch.long)
        torch.ne(self.tokens, -1, out=self.in_prompt)
        self.done.zero_()
        self.ends.copy_(torch.tensor(ends))
        self.cur.zero_()


def greedy_step(model: Transformer, cache: KVCache, state: DecodeState, eos: int) -> None:
    """One greedy step of the whole batch, in place: the token at `state.cur - 1` goes in, the most
    likely next one is written at `state.cur` (a row still inside its prompt keeps its own token, a
    finished row its -1), finished rows are marked, `cur` moves on. Fixed shapes, no host reads:
    torch.compile makes it one graph, which on CUDA is captured and replayed."""
    bsz = state.tokens.size(0)
    pos = state.cur.expand(bsz, 1)  # (B, 1)
    x = state.tokens.gather(1, pos - 1).clamp(min=0)  # (B, 1) last token in
    logits = model(x, cache=cache, input_pos=state.cur - 1)  # (B, 1, V)
    nxt = logits[:, -1].argmax(dim=-1)  # (B,)
    own = state.tokens.gather(1, pos).squeeze(1)  # the prompt's token, or -1
    prompt = state.in_prompt.gather(1, pos).squeeze(1)
    nxt = torch.where(prompt | state.done, own, nxt)
    state.tokens.scatter_(1, pos, nxt[:, None])
    state.done.logical_or_(~prompt & (nxt == eos))
    state.done.logical_or_(state.cur + 1 >= state.ends)
    state.cur.add_(1)


class EagerDecoder:
    name = "eager"
    whole_greedy_steps = False  # True where `greedy_step(cache, state, eos)` runs a whole step at once

    def __init__(self, model: Transformer):
        self.model = model

    def decode_state(self, batch: int, width: int, device) -> DecodeState:
        """Buffers for generating `batch` rows of up to `width` positions."""
        return DecodeState(batch, width, device)

    def __call__(self, tokens: torch.Tensor, start_pos: int, cache: KVCache, last_only: bool = False) -> torch.Tensor:
        return self.model(tokens, start_pos, cache, last_only=last_only).float()

    def refreshed(self) -> "EagerDecoder":
        """The decoder to use from now on (checked once per generate call)."""
        return self


class PackedProjections:
    """wq, wk, wv of each attention and w1, w3 of each feed-forward as one product each, so a
    one-token step runs 4 matrix-vector products per layer instead of 7: fewer and larger kernels,
    which is what bounds a GPU's batch-1 step. The weights (and int8 scales) become views of the
    stacked matrices, so no memory is added and in-place updates (load_state_dict, an optimizer)
    reach both. The model uses them only inside `with packs:` (the decoder's own calls); elsewhere it
    is unchanged. Plain bias-free nn.Linear layers of one dtype and device pack, and so do
    llama.quantize's Int8Linear ones; others (LoRA, tensor-parallel shards) stay as they are."""

    def __init__(self, model: Transformer, pack: bool = True):
        self.packed: list[tuple[torch.nn.Module, str, Stacked]] = []
        with torch.inference_mode(False), torch.no_grad():  # the parameters must stay usable for training
            for block in model.layers if pack else ():
                for module, names, attr in ((block.attention, ("wq", "wk", "wv"), "wqkv"),
                                            (block.feed_forward, ("w1", "w3"), "w13")):
                    linears = [getattr(module, n, None) for n in names]
                    if _packable(linears):
                        self.packed.append((module, attr, Stacked(linears)))

    def __enter__(self):
        for module, attr, stacked in self.packed:
            setattr(module, attr, stacked)
        return self

    def __exit__(self, *exc):
        for module, attr, _ in self.packed:
            setattr(module, attr, None)


class Stacked:
    """The product of several bias-free linears of one input as one: their weight rows (and int8
    scales) stacked; each layer's own tensors then views of its rows."""

    def __init__(self, linears):
        self.weight = _stack([lin.weight for lin in linears])
        self.scales = _stack([lin.scales for lin in linears]) if type(linears[0]) is Int8Linear else None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight) if self.scales is None else int8_linear(x, self.weight, self.scales)


def _packable(linears) -> bool:
    if all(type(lin) is Int8Linear for lin in linears):
        return len({(lin.scales.dtype, lin.weight.device, lin.in_features) for lin in linears}) == 1
    if not all(type(lin) is torch.nn.Linear and lin.bias is None and type(lin.weight.data) is torch.Tensor
               for lin in linears):
        return False
    w = [lin.weight for lin in linears]
    return len({(t.dtype, t.device, t.size(1)) for t in w}) == 1


def _stack(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The tensors concatenated along their rows; each one's data then a view of its rows."""
    stacked = torch.cat([t.data for t in tensors])
    row = 0
    for t in tensors:
        t.data = stacked[row:row + t.size(0)]
        row += t.size(0)
    return stacked


def _gpu_kernel_option(name: str, value: bool | None, on_cuda: bool) -> bool:
    """A llama.gpu_kernels option of CompiledDecoder: None is on where the kernels can run (CUDA and
    Triton); True where they cannot is refused, naming the option."""
    if value and not (gemv_available() and (on_cuda or INTERPRET)):
        raise ValueError(f"{name}=True needs Triton and the model on a CUDA device (Triton ships with CUDA builds "
                         "of torch)")
    return (on_cuda and gemv_available()) if value is None else value


def _decode_step(model: Transformer, tokens: torch.Tensor, cache: KVCache, input_pos: torch.Tensor) -> torch.Tensor:
    return model(tokens, cache=cache, input_pos=input_pos)


class CompiledDecoder(EagerDecoder):
    """One-token steps compiled (torch.compile, fullgraph, static shapes); prefill eager. The first
    steps compile (seconds to a minute); every later position reuses the graph. Greedy decoding
    runs whole steps (`greedy_step`: model, argmax and bookkeeping) as one compiled graph.

    On CUDA those graphs are also captured as CUDA graphs (`cuda_graphs`, default on for CUDA
    unless torch.compile's own mode="reduce-overhead" does that): a step is then one graph launch
    with no host work per layer or kernel, so the GPU streams the weights back to back. Logits
    returned by a captured one-token step live in the graph's buffer until the next step.
    `pack=False` keeps the separate q/k/v and gate/up projections (see PackedProjections).
    `gemv` runs the step's one-row products (bf16/fp16 weights, and llama.quantize's int8 ones) on
    llama.gpu_kernels' Triton kernel instead of cuBLAS (or, for int8, a compiled reduction), and
    `attention_kernel` the step's attention on its `decode_attention` (which reads the cache only up
    to the position, where sdpa reads all of it under a mask): each default on for CUDA where Triton
    is installed."""

    name = "compiled"
    whole_greedy_steps = True

    def __init__(self, model: Transformer, cuda_graphs: bool | None = None, pack: bool = True,
                 gemv: bool | None = None, attention_kernel: bool | None = None, **compile_options):
        super().__init__(model)
        self.step = torch.compile(_decode_step, fullgraph=True, dynamic=False, **compile_options)
        self.greedy = torch.compile(greedy_step, fullgraph=True, dynamic=False, **compile_options)
        on_cuda = _model_device(model).type == "cuda"
        if cuda_graphs and not on_cuda:
            raise ValueError("cuda_graphs=True needs the model on a CUDA device")
        graphs_by_compile = compile_options.get("mode") in ("reduce-overhead", "max-autotune")
        self.cuda_graphs = (on_cuda and not graphs_by_compile) if cuda_graphs is None else cuda_graphs
        self._graphs: dict[tuple, tuple] = {}  # what a graph reads (batch, buffers' addresses) -> (graph, its outputs)
        self._states: dict[tuple, DecodeState] = {}  # (batch, width) -> buffers kept for the graphs
        self.pack = pack  # PackedProjections for the one-token steps
        self.packs = PackedProjections(model, pack)
        self._weights = _addresses(model)
        self.gemv = _gpu_kernel_option("gemv", gemv, on_cuda)
        self.attention_kernel = _gpu_kernel_option("attention_kernel", attention_kernel, on_cuda)

    @contextlib.contextmanager
    def _tracing(self):
        """What the one-token steps run inside: the packed projections, and the GPU kernels."""
        with (self.packs, OneRowLinears() if self.gemv else contextlib.nullcontext(),
              OneTokenAttention() if self.attention_kernel else contextlib.nullcontext()):
            yield

    def decode_state(self, batch, width, device):
        # the same buffers every time, so a captured whole-step graph can be replayed
        key = (batch, width, str(device))
        if key not in self._states:
            self._states[key] = DecodeState(batch, width, device)
        return self._states[key]

    def __call__(self, tokens, start_pos, cache, last_only=False):
        if tokens.size(1) != 1:
            return super().__call__(tokens, start_pos, cache, last_only)
        pos = torch.full((1,), start_pos, dtype=torch.long, device=tokens.device)  # a fill, not a host copy
        if not self.cuda_graphs:
            with self._tracing():
                return self.step(self.model, tokens, cache, pos).float()
        key = ("step", tokens.shape, cache.k.data_ptr(), cache.v.data_ptr())
        if key not in self._graphs:
            inputs = (tokens.clone(), pos.clone())
            with self._tracing():
                self._graphs[key] = (*_capture(lambda: self.step(self.model, inputs[0], cache, inputs[1]).float(),
                                               lambda: self.step(self.model, inputs[0].clone(), cache, inputs[1].clone())),
                                     inputs)
        graph, logits, (static_tokens, static_pos) = self._graphs[key]
        static_tokens.copy_(tokens)
        static_pos.copy_(pos)
        graph.replay()
        return logits

    def greedy_step(self, cache: KVCache, state: DecodeState, eos: int) -> None:
        """`greedy_step` of the whole batch: compiled; on CUDA one replay of its captured graph."""
        if not self.cuda_graphs:
            with self._tracing():
                self.greedy(self.model, cache, state, eos)
            return
        key = ("greedy", state.tokens.data_ptr(), cache.k.data_ptr(), cache.v.data_ptr(), eos)
        if key not in self._graphs:
            saved = _copy(state)

            def warm_up():  # a real step, then the state as it was (the cache write is redone by the replay)
                self.greedy(self.model, cache, state, eos)
                for name, t in saved.__dict__.items():
                    getattr(state, name).copy_(t)
            with self._tracing():
                self._graphs[key] = _capture(lambda: self.greedy(self.model, cache, state, eos), warm_up)
        self._graphs[key][0].replay()

    def refreshed(self) -> "CompiledDecoder":
        # a captured graph reads the weights at the addresses it saw: replaced or moved weights
        # (cast, quantized, reloaded) need new graphs
        weights = _addresses(self.model)
        if weights != self._weights:
            self._graphs.clear()
            self.packs = PackedProjections(self.model, self.pack)  # the new weights, packed again
            self._weights = _addresses(self.model)
        return self


def _capture(run, warm_up):
    """(a CUDA graph of `run()`, what run returned inside it). `warm_up()` first compiles, autotunes
    and allocates outside the capture, on a side stream as CUDA graphs require: it does what run
    does but leaves the step's inputs as they were; its only lasting write is the KV cache at the
    position this very step then writes for real."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            warm_up()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run()
    return graph, out


def _copy(state: DecodeState) -> DecodeState:
    """A DecodeState holding clones of `state`'s tensors."""
    twin = object.__new__(DecodeState)
    twin.__dict__ = {k: v.clone() for k, v in state.__dict__.items()}
    return twin


def _model_device(model: Transformer) -> torch.device:
    return next(model.parameters(), next(model.buffers(), torch.empty(0))).device


def _addresses(model: Transformer) -> tuple:
    return tuple(t.data_ptr() for t in (*model.parameters(), *model.buffers()))
