"""The `shipyard-runtime` command: dispatches to `compress` (the compression Job), `serve` (the inference server),
`evaluate` (scores a live endpoint: the `job` analysis provider) and `fetch` (downloads a model before it is loaded).

Each subcommand's module is imported only when that subcommand runs, so `--help` stays fast and torch is
loaded only by the command that needs it.
"""

from __future__ import annotations

import importlib
import sys

SUBCOMMANDS = {
    "compress": ("shipyard.runtime.compress", "Compress a model (prune, quantize, distill) behind an accuracy gate."),
    "serve": ("shipyard.runtime.server.lifecycle", "Serve a model over the Open Inference Protocol v2 (REST)."),
    "evaluate": ("shipyard.runtime.liveeval", "Score a live OIP v2 endpoint with a gate dataset (analysis Job)."),
    "fetch": ("shipyard.runtime.fetch", "Download a model (s3://, https://): verified, atomic, cached per node."),
}


def _usage() -> str:
    lines = ["usage: shipyard-runtime {" + ",".join(SUBCOMMANDS) + "} [options]", "", "subcommands:"]
    lines += [f"  {name:<10} {help_}" for name, (_, help_) in SUBCOMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in {"-h", "--help"}:
        print(_usage())
        return 0 if args else 2
    name, rest = args[0], args[1:]
    if name not in SUBCOMMANDS:
        print(f"shipyard-runtime: unknown subcommand {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(SUBCOMMANDS[name][0])
    result: int = module.main(rest)
    return result


if __name__ == "__main__":
    sys.exit(main())
