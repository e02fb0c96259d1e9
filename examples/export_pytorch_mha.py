#!/usr/bin/env python3
"""Export a PyTorch nn.MultiheadAttention to a .safetensors file that mha can load.

The file holds the module's state_dict under its own names (in_proj_weight, out_proj.weight, ...,
or q/k/v_proj_weight when kdim/vdim differ from embed_dim), which mha::io::from_state_dict reads,
and metadata: num_heads, add_zero_attn (which a state_dict does not hold), the torch version.
Given inputs, it also holds four tensors for checking: "check.query", "check.key", "check.value"
(L x E, S x kdim, S x vdim) and "check.output" (PyTorch's output for them, need_weights=False, eval
mode, no autograd). examples/pytorch_import.cpp loads such a file and prints the largest difference
between mha's output and PyTorch's.

Your own module, from Python:

    import sys; sys.path.insert(0, "examples")
    from export_pytorch_mha import export_mha
    export_mha(my_attention, "my_attention.safetensors")              # the weights alone
    export_mha(my_attention, "checked.safetensors", query, key, value)  # and a check, L x E inputs

and in C++ mha::io::from_state_dict<float>(mha::io::SafeTensors::load(path), num_heads). The
inputs are unbatched (2-D), whether the module is batch_first or not; key and value default to
the query (self-attention). Float32, float64, float16 and bfloat16 modules are written in their
own dtype (F32, F64, F16, BF16).

From the command line, a random module of the given shape (nonzero biases, so that loading them
wrongly would show), with random inputs and its output:

    /usr/bin/python3 examples/export_pytorch_mha.py mha_module.safetensors
    /usr/bin/python3 examples/export_pytorch_mha.py out.safetensors --kdim 6 --vdim 10 --dtype float64

Needs Debian's python3-torch (1.13). The .safetensors format is written here directly (8-byte
little-endian header length, JSON header, raw little-endian data), so no other package is needed.
"""

import argparse
import json
import struct

import torch

DTYPES = {torch.float32: "F32", torch.float64: "F64", torch.float16: "F16", torch.bfloat16: "BF16",
          torch.bool: "BOOL"}


def tensor_bytes(t):
    """The elements of tensor `t` in row-major order, little-endian, as safetensors stores them."""
    t = t.detach().contiguous().cpu()
    if t.dtype == torch.bfloat16:  # numpy has no bfloat16: its bits, as 16-bit integers
        t = t.view(torch.int16)
    return t.numpy().tobytes()


def save_safetensors(path, tensors, metadata):
    """Writes {name: tensor} and {str: str} metadata in the safetensors format, names sorted."""
    header, blobs, offset = {"__metadata__": metadata}, [], 0
    for name in sorted(tensors):
        t = tensors[name]
        data = tensor_bytes(t)
        header[name] = {"dtype": DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the format pads the header to a multiple of 8 bytes
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + b"".join(blobs))


def export_mha(module, path, query=None, key=None, value=None):
    """Saves the nn.MultiheadAttention `module` to `path` in the format mha::io::from_state_dict reads.

    With `query` (L x E; `key` and `value`, S x kdim and S x vdim, default to it), also saves the
    inputs and the module's output for them as check.query, check.key, check.value, check.output.
    The module is run in eval mode without autograd and left in the mode it was in.
    Returns the dict of tensors written.
    """
    if not isinstance(module, torch.nn.MultiheadAttention):
        raise TypeError(f"export_mha takes a torch.nn.MultiheadAttention, got {type(module).__name__}")
    tensors = {name: t.detach() for name, t in module.state_dict().items()}
    if query is not None:
        key = query if key is None else key
        value = key if value is None else value
        if query.dim() != 2 or key.dim() != 2 or value.dim() != 2:
            raise ValueError("export_mha's inputs are unbatched: query L x E, key S x kdim, value S x vdim")
        was_training = module.training
        module.eval()
        try:
            with torch.no_grad():
                output, _ = module(query, key, value, need_weights=False)
        finally:
            module.train(was_training)
        tensors.update({"check.query": query, "check.key": key, "check.value": value, "check.output": output})
    save_safetensors(path, tensors, {"num_heads": str(module.num_heads),
                                     "add_zero_attn": str(int(module.add_zero_attn)), "torch": torch.__version__})
    return tensors


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path")
    parser.add_argument("--embed-dim", type=int, default=16)
    parser.add_argument("--num-heads", type=int, default=4)
    parser.add_argument("--kdim", type=int, default=None)
    parser.add_argument("--vdim", type=int, default=None)
    parser.add_argument("--no-bias", action="store_true")
    parser.add_argument("--add-bias-kv", action="store_true")
    parser.add_argument("--add-zero-attn", action="store_true")
    parser.add_argument("--queries", type=int, default=5)
    parser.add_argument("--keys", type=int, default=7)
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    dtype = getattr(torch, args.dtype)
    module = torch.nn.MultiheadAttention(args.embed_dim, args.num_heads, bias=not args.no_bias,
                                         add_bias_kv=args.add_bias_kv, add_zero_attn=args.add_zero_attn,
                                         kdim=args.kdim, vdim=args.vdim, batch_first=True, dtype=dtype).eval()
    with torch.no_grad():  # nonzero biases, so that loading them wrongly would show
        for name, p in module.named_parameters():
            if "bias" in name:
                p.uniform_(-0.5, 0.5)
    kdim, vdim = args.kdim or args.embed_dim, args.vdim or args.embed_dim
    query = torch.rand(args.queries, args.embed_dim, dtype=dtype) * 2 - 1
    key = torch.rand(args.keys, kdim, dtype=dtype) * 2 - 1
    value = torch.rand(args.keys, vdim, dtype=dtype) * 2 - 1
    tensors = export_mha(module, args.path, query, key, value)
    print(f"wrote {args.path}: " + ", ".join(f"{k} {list(v.shape)}" for k, v in sorted(tensors.items())))


if __name__ == "__main__":
    main()
