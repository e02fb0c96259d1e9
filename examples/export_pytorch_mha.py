#!/usr/bin/env python3
"""Export a PyTorch nn.MultiheadAttention to a .safetensors file that mha can load.

The file holds the module's state_dict under its own names (in_proj_weight, out_proj.weight, ...,
or q/k/v_proj_weight when kdim/vdim differ from embed_dim), plus three tensors for checking:
"check.query", "check.key", "check.value" (inputs, L x E, S x kdim, S x vdim) and "check.output"
(PyTorch's output for them, need_weights=False, eval mode), and metadata: num_heads,
add_zero_attn, the torch version. examples/pytorch_import.cpp loads it and prints the largest
difference between mha's output and PyTorch's.

    /usr/bin/python3 examples/export_pytorch_mha.py mha_module.safetensors
    /usr/bin/python3 examples/export_pytorch_mha.py out.safetensors --kdim 6 --vdim 10 --dtype float64

Needs Debian's python3-torch (1.13). The .safetensors format is written here directly (8-byte
little-endian header length, JSON header, raw little-endian data), so no other package is needed.
"""

import argparse
import json
import struct

import torch

DTYPES = {torch.float32: "F32", torch.float64: "F64"}


def save_safetensors(path, tensors, metadata):
    """Writes {name: tensor} and {str: str} metadata in the safetensors format, names sorted."""
    header, blobs, offset = {"__metadata__": metadata}, [], 0
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        data = t.numpy().tobytes()
        header[name] = {"dtype": DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the format pads the header to a multiple of 8 bytes
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + b"".join(blobs))


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
    query = torch.rand(1, args.queries, args.embed_dim, dtype=dtype) * 2 - 1
    key = torch.rand(1, args.keys, kdim, dtype=dtype) * 2 - 1
    value = torch.rand(1, args.keys, vdim, dtype=dtype) * 2 - 1
    with torch.no_grad():
        output, _ = module(query, key, value, need_weights=False)
    tensors = dict(module.state_dict())
    tensors.update({"check.query": query[0], "check.key": key[0], "check.value": value[0], "check.output": output[0]})
    save_safetensors(args.path, tensors, {"num_heads": str(args.num_heads), "add_zero_attn": str(int(args.add_zero_attn)),
                                          "torch": torch.__version__})
    print(f"wrote {args.path}: " + ", ".join(f"{k} {list(v.shape)}" for k, v in sorted(tensors.items())))


if __name__ == "__main__":
    main()
