"""`python -m qwen3_scratch COMMAND ...`: the table of subcommands, each owned by the chapter that builds it.

Hand-written (not generated). An entry names the module whose `main(argv)` runs the command; that module is
imported only when its command is used, so `chat` never imports the training or serving code. A module whose
own parser already knows several commands (chapter 9's `cli`: chat and generate) gets the command name too.
"""
import os
import sys
from importlib import import_module

# command: (module, does the module's parser take the command name itself?, one-line help)
COMMANDS = {  # in chapter order
    "chat": ("qwen3_scratch.cli", True, "interactive chat with a checkpoint (chapter 9)"),
    "generate": ("qwen3_scratch.cli", True, "continue one prompt and print the new text (chapter 9)"),
    "bench": ("qwen3_scratch.lab.bench_run", False, "the chapter 11 benchmarks: results/*.json|csv and figures"),
    "train": ("qwen3_scratch.data_parallel", False,  # chapter 12's command; under torchrun DDP/FSDP (chapter 16)
              "train a tokenizer and a tiny Qwen3 on your text (chapter 12; under torchrun: chapter 16)"),
    "finetune": ("qwen3_scratch.finetune", False, "fine-tune on chat data, LoRA or full (chapter 13)"),
    "quant": ("qwen3_scratch.lab.quant_bench", False,
              "the chapter 14 quantization benchmark: results/quant_cpu.json, figures"),
    "serve": ("qwen3_scratch.server", True, "an OpenAI-compatible HTTP server with continuous batching (chapter 17)"),
    "serve-bench": ("qwen3_scratch.lab.serve_bench", False,
                    "chapter 17's throughput benchmark: sequential vs concurrent"),
    "reasoning-lab": ("qwen3_scratch.lab.reasoning", False,
                      "chapter 18's full run: cold start, GRPO, fusion, budget; checkpoints, results, figures"),
    "distill": ("qwen3_scratch.distill_cli", True, "distill a teacher into a student, off- or on-policy (chapter 19)"),
    "distill-lab": ("qwen3_scratch.lab.students", False,
                    "chapter 19's four students (scratch, distilled, on-policy, pruned): results, figures"),
    "spec-bench": ("qwen3_scratch.lab.spec_bench", False,
                   "chapter 20's speculative decoding benchmark: results/speculative_*.json and figures"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {help_}" for name, (_, _, help_) in COMMANDS.items()]
    return ("usage: python -m qwen3_scratch COMMAND [options]   (COMMAND --help for its options)\n\n"
            "Run Qwen3 built from scratch (qwen3_scratch).\n\ncommands:\n" + "\n".join(lines) + "\n")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        (sys.stdout if argv else sys.stderr).write(usage())
        return 0 if argv else 2
    if argv[0] not in COMMANDS:
        sys.stderr.write(usage() + f"\nerror: unknown command {argv[0]!r}\n")
        return 2
    module, takes_name, _ = COMMANDS[argv[0]]
    status = import_module(module).main(argv if takes_name else argv[1:])
    return status if isinstance(status, int) else 0  # some mains return their results


def exit_now_if_torchrun_worker(status: int) -> None:
    """A process torchrun started ends here, without the interpreter's teardown: after destroy_process_group and
    the atexit handlers, tearing down can still abort it ("terminate called without an active exception", exit
    status -6, so torchrun reports a failed run that had finished and written everything). Seen in 4 of 162 runs of
    chapter 16's FSDP `train` on a loaded 2-core CPU; os._exit skips that teardown once the output is flushed."""
    if "torch" not in sys.modules:  # no torch, no process group: nothing to skip (and `--help` stays light)
        return
    from qwen3_scratch.distributed import launched_by_torchrun
    if launched_by_torchrun():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)


if __name__ == "__main__":
    code = main()
    exit_now_if_torchrun_worker(code)
    raise SystemExit(code)
