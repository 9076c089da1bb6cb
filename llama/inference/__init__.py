"""Inference: `Llama` (build, complete, stream), sampling, and the decoding strategies."""

from llama.inference.decoders import DECODERS, CompiledDecoder, EagerDecoder
from llama.inference.llama import Llama, make_decoder
from llama.inference.sampling import check_sampling, sample

__all__ = ["DECODERS", "CompiledDecoder", "EagerDecoder", "Llama", "check_sampling", "make_decoder", "sample"]
