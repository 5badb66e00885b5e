"""`python -m mochi_preview.decode LATENTS [flags]`: decode a latents file into its MP4 and sidecar.

A latents file comes from `--save_latents`, or is left by a decode that ran out of memory. Only the VAE decoder
loads; any decode settings may be given (`--vae_tiling on`, `--device cpu`, ...). The same as
`python -m mochi_preview.infer --decode_latents LATENTS [flags]`.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

USAGE = (
    "usage: python -m mochi_preview.decode LATENTS [--model_dir DIR] [--vae_tiling auto|on|off] "
    "[--output FILE | --out_dir DIR] [--device DEVICE] [--dtype auto|bf16|fp32] [--quiet]"
)


def main(argv: Sequence[str] | None = None) -> int:
    argv = [str(a) for a in (sys.argv[1:] if argv is None else argv)]
    if argv[:1] in (["-h"], ["--help"]):
        print(f"{USAGE}\n\n{__doc__.strip()}")
        return 0
    if not argv or argv[0].startswith("-"):
        print(f"{USAGE}\nerror: the latents file comes first", file=sys.stderr)
        return 2
    from .infer import main as infer

    return infer(["--decode_latents", argv[0], *argv[1:]])


if __name__ == "__main__":
    sys.exit(main())
