"""The `minigpt` command line: each command parses its inputs and calls one function of prepare_data.py,
train.py or sample.py. Heavy modules (torch) are imported inside the commands, so `--help` is instant.

Bad input anywhere (a UserError) ends as one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer
import typer.core


class OneLineErrors(typer.core.TyperGroup):
    """Every bad input as one `error:` line on stderr with exit code 2: a UserError from a command, and click's own
    usage errors (an unknown option or command, a missing argument, a value of the wrong type), which it would
    print as a usage banner and a boxed message."""

    def main(self, *args, standalone_mode: bool = True, **kwargs):
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            code = super().main(*args, standalone_mode=False, **kwargs)  # a typer.Exit's code, or None
        except typer.BadParameter.__base__ as e:  # click's UsageError (typer >= 0.22 vendors its own click)
            message, ctx = " ".join(e.format_message().split()), getattr(e, "ctx", None)
            if message:  # none when a group called without a command has printed its help instead
                path = ctx.command_path.split() if ctx is not None else []
                if path and path[0].endswith(".py"):  # `python train.py ...` runs `train ...`: not named twice
                    del path[1:2]
                hint = f" (see: {' '.join(path)} --help)" if path else ""
                print(f"error: {message}{hint}", file=sys.stderr)
            sys.exit(e.exit_code)
        except typer.Abort:
            print("aborted", file=sys.stderr)
            sys.exit(1)
        except Exception as e:
            from errors import UserError  # here, not at the top: `--help` imports nothing heavy

            if not isinstance(e, UserError):
                raise
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        sys.exit(code if isinstance(code, int) else 0)


app = typer.Typer(
    cls=OneLineErrors,
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Train GPT-style transformers from a terminal: prepare data, train, sample, resume.",
)


def config_from(path: Path, overrides: list[str], *, read_only: bool = False):
    """The config of a TOML file, or of a run (its folder or a checkpoint file) with the checkpoint itself;
    --set overrides apply to either.

    A checkpoint written by another minigpt may hold config keys this one does not know: those are that release's
    settings, not typos. Resuming refuses them (they may change how the run trains), naming the release that wrote
    it; with read_only (a command that only looks at the run) keys outside [model] are left out with a note on
    stderr, and [model]'s are refused (the weights may depend on them)."""
    from cli.config_loader import ConfigError, build_config, load_config, split_unknown

    import train as trainer
    from checkpoint import load_checkpoint, minigpt_version, unknown_settings, use_writer, written_by

    if path.is_dir() or path.suffix == ".pt":
        checkpoint = load_checkpoint(path)
        file = path / "ckpt.pt" if path.is_dir() else path
        verb = "use" if read_only else "resume"
        data, unknown = split_unknown(trainer.Config, checkpoint["config"])
        model_keys = [k for k in unknown if k.startswith("model.")]
        if unknown and not read_only:
            raise unknown_settings(file, checkpoint, "config keys", unknown, verb)
        if model_keys:
            raise unknown_settings(file, checkpoint, "model settings", model_keys, verb)
        if unknown:
            print(f"note: {file} was written by {written_by(checkpoint)}; leaving out the config keys this minigpt "
                  f"({minigpt_version()}) does not know (none is the model's): {', '.join(unknown)}", file=sys.stderr)
        try:
            return build_config(trainer.Config, data, overrides), checkpoint
        except ConfigError as e:
            error = e
        try:  # the checkpoint's own config, without the overrides: a value this release does not accept?
            build_config(trainer.Config, data)
        except ConfigError as e:
            raise ConfigError(f"{file} holds a config this minigpt ({minigpt_version()}) cannot read ({e}); it was "
                              f"written by {written_by(checkpoint)}: {use_writer(checkpoint, verb)}") from None
        raise error  # the overrides' fault: a typo gets its suggestion
    return load_config(trainer.Config, path, overrides), None


@app.command()
def prepare(
    source: str = typer.Argument(..., help="text: 'shakespeare', a .txt file (one document), a folder of .txt files "
                                 "(a document each), a .jsonl of {\"text\": ...} lines, a .parquet file or a folder of "
                                 "them, or hf:NAME[:CONFIG] (a Hugging Face dataset, streamed); source/target pairs: "
                                 "'task:NAME' (copy, reverse, sort, add, speaker, modernize), a .tsv of "
                                 "source<TAB>target lines, or a .jsonl of {\"source\": ..., \"target\": ...} lines"),
    tokenizer: str = typer.Option("char", help="char | gpt2 | bpe (a byte-level BPE trained on the corpus) | a path: "
                                  "a minigpt run folder or .pt checkpoint, or a Hugging Face model folder, whose "
                                  "tokenizer is used as it is"),
    vocab_size: Optional[int] = typer.Option(None, help="vocabulary size for --tokenizer bpe"),
    out: Optional[Path] = typer.Option(None, help="output folder (default: data/<source>_<tokenizer>, "
                                       "data/task_<name>_<tokenizer> for task:NAME)"),
    input: Optional[Path] = typer.Option(None, "--input", help="a local copy of the tiny-Shakespeare corpus, for "
                                         "'shakespeare', task:speaker and task:modernize"),
    val_fraction: float = typer.Option(0.1, help="share kept for validation: the end of a one-document text; whole "
                                       "documents, drawn with --seed, of a corpus of documents; a random share of a "
                                       "pairs file's pairs (task:NAME sets its own)"),
    workers: Optional[int] = typer.Option(None, help="processes that read and tokenize (default: one per core)"),
    text_key: Optional[str] = typer.Option(None, help="the field (.jsonl) or column (.parquet, hf:) holding the "
                                           "text [default: text]"),
    max_docs: Optional[int] = typer.Option(None, help="take only the first N documents of a corpus"),
    bpe_sample_bytes: Optional[int] = typer.Option(None, help="--tokenizer bpe learns its merges from the first "
                                                   "this many bytes of the train text [default: 100 MB]"),
    examples: Optional[int] = typer.Option(None, help="task:NAME only: train pairs (default: 10000 for generated "
                                           "tasks, all for speaker and modernize)"),
    seed: int = typer.Option(1337, help="draws a corpus's val documents; shuffles a pairs file's pairs before the "
                             "split; seeds task:NAME"),
    force: bool = typer.Option(False, "--force", help="overwrite an output folder prepared differently"),
):
    """Tokenize a corpus into data/<name>/ (train.bin, val.bin, meta.json), or source/target pairs (per split
    .bin and .idx) for sequence-to-sequence training. Any size, in bounded memory, on all cores; Ctrl-C leaves
    no half-written dataset."""
    import prepare_data

    prepare_data.prepare(source, tokenizer=tokenizer, vocab_size=vocab_size, out=out, input_path=input,
                         val_fraction=val_fraction, force=force, examples=examples, seed=seed, workers=workers,
                         text_key=text_key, max_docs=max_docs, bpe_sample_bytes=bpe_sample_bytes)


@app.command()
def train(
    config: Optional[Path] = typer.Argument(None, help="a TOML config, e.g. config/shakespeare_char.toml"),
    resume: Optional[Path] = typer.Option(None, "--resume", help="continue the run in this folder from ckpt.pt"),
    set_: List[str] = typer.Option([], "--set", help="override a config key: --set optim.lr=6e-4 (repeatable)"),
    print_config: bool = typer.Option(False, "--print-config", help="print the resolved config as TOML and exit"),
):
    """Train a model from a config, or resume a run (Ctrl-C saves a checkpoint and stops)."""
    from dataclasses import replace

    from cli.config_loader import config_to_toml
    from errors import UserError

    import train as trainer
    from runtime import end_torchrun_worker

    if (config is None) == (resume is None):
        raise UserError("pass either a config file (minigpt train config/debug.toml) or --resume RUN_DIR")
    if resume is not None and not (resume.is_dir() or resume.suffix == ".pt"):
        raise UserError(f"--resume takes a run folder (or its ckpt.pt), got {resume}")
    if config is not None and (config.is_dir() or config.suffix == ".pt"):  # it would train from that checkpoint
        folder = config if config.is_dir() else config.parent
        raise UserError(f"{config} is a run, not a config: continue it with `minigpt train --resume {folder}`, or "
                        f"start a new run from its config with `minigpt train {folder / 'config.toml'} "
                        "--set run.out_dir=NEW`")
    if resume is not None and any(o.split("=", 1)[0].strip() == "run.out_dir" for o in set_):
        raise UserError(f"a resumed run continues in its own folder ({resume}): drop --set run.out_dir, or copy the "
                        "folder and resume the copy")
    cfg, checkpoint = config_from(config or resume, set_)
    if checkpoint is not None and checkpoint.get("imported_from"):  # weights without an optimizer or a schedule
        raise UserError(f"{resume} was imported, not trained, so there is nothing to resume: fine-tune it with a "
                        f"config that sets init.from = \"{resume}\" (e.g. config/finetune_shakespeare.toml "
                        f"--set init.from={resume})")
    if resume is not None:  # the run continues where it lies
        cfg = replace(cfg, run=replace(cfg.run, out_dir=str(resume if resume.is_dir() else resume.parent)))
    else:  # config.toml and --print-config show the schedule the run will follow
        cfg = trainer.fix_schedule(cfg)
    # and the model init.from names (train() resolves it again, saying which [model] keys do not apply)
    resolved = trainer.finetune_config(cfg)[0] if resume is None else cfg
    if print_config:
        typer.echo(config_to_toml(resolved), nl=False)
        return
    result = trainer.train(cfg, checkpoint=checkpoint, config_text=config_to_toml(resolved))
    if result.world_size > 1:
        end_torchrun_worker()


@app.command()
def sample(
    run_dir: Path = typer.Argument(..., help="a run folder written by `minigpt train`, or one of its .pt files"),
    prompt: str = typer.Option("", help="text to continue [default: start of text]"),
    prompt_file: Optional[Path] = typer.Option(None, help="read the prompt from this file"),
    num_samples: int = typer.Option(1, help="how many samples to generate"),
    max_new_tokens: Optional[int] = typer.Option(None, help="tokens per sample"),
    temperature: Optional[float] = typer.Option(None, help="0 = greedy; lower is more conservative"),
    top_k: Optional[int] = typer.Option(None, help="sample among the k most likely tokens (0 = all)"),
    top_p: Optional[float] = typer.Option(None, help="nucleus sampling threshold (1 = off)"),
    seed: Optional[int] = typer.Option(None, help="random seed: the same seed gives the same text"),
    device: str = typer.Option("auto", help="auto | cpu | cuda | cuda:N | mps"),
    dtype: str = typer.Option("auto", help="auto | float32 | bfloat16 | float16: the weights' dtype while decoding "
                              "(auto: the GPU's autocast dtype; on a CPU bfloat16 above 4M parameters, else float32)"),
    checkpoint: Optional[str] = typer.Option(None, help="latest (ckpt.pt, the default) | best (best.pt) of a run "
                                              "folder"),
    no_kv_cache: bool = typer.Option(False, "--no-kv-cache", help="recompute the whole context every token"),
    compile: bool = typer.Option(False, "--compile", help="torch.compile the decode step (a CUDA graph on a GPU): "
                                 "faster tokens after a compile of seconds to a minute"),
    beams: Optional[int] = typer.Option(None, help="beam search with this many beams (deterministic; runs trained "
                                        "on pairs); 1 = greedy"),
    length_penalty: Optional[float] = typer.Option(None, help="beam search ranks hypotheses by log-probability / "
                                                   "length^A [default: 1.0]"),
    draft: Optional[Path] = typer.Option(None, "--draft", help="speculative decoding: a smaller run with the same "
                                         "tokenizer proposes tokens, this run checks them (the same output "
                                         "distribution)"),
    draft_tokens: Optional[int] = typer.Option(None, "--draft-tokens", help="tokens the draft proposes per check "
                                               "[default: 4]"),
):
    """Generate text from a trained run, streaming it to the terminal; on a run trained on pairs, the target for
    the source given as --prompt, one line per sample."""
    from errors import UserError

    import sample as sampler

    if prompt_file is not None:
        if prompt:
            raise UserError("pass --prompt or --prompt-file, not both")
        try:
            prompt = prompt_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"cannot read --prompt-file {prompt_file}: {getattr(e, 'strerror', None) or e}") from None
    if num_samples < 1:
        raise UserError(f"--num-samples must be >= 1, got {num_samples}")
    if compile and no_kv_cache:
        raise UserError("--compile compiles the KV-cached decode step; drop --no-kv-cache or --compile")
    given = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    try:  # options left out take SampleConfig's defaults: one place defines them
        sc = sampler.SampleConfig(**{k: v for k, v in given.items() if v is not None}, kv_cache=not no_kv_cache,
                                  compile=compile)
    except ValueError as e:
        raise UserError(f"--{str(e).replace('_', '-')}") from None
    sampler.check_beam_options(beams, length_penalty)
    if beams is not None:
        ignored = [f"--{k.replace('_', '-')}" for k in ("top_k", "top_p", "seed") if given[k] is not None]
        if temperature not in (None, 0):
            ignored.append("--temperature")
        if ignored:  # beam search chooses by probability alone
            raise UserError(f"beam search is deterministic: {', '.join(ignored)} does not apply to --beams; drop it "
                            "(--temperature 0 is accepted)")
        if num_samples > beams:
            raise UserError(f"--num-samples ({num_samples}) must be <= --beams ({beams}): it prints the best hypotheses")
    if compile and beams is not None:
        raise UserError("--compile applies to sampling a token stream, not to --beams; drop one of them")
    if draft_tokens is not None and draft is None:
        raise UserError("--draft-tokens is how many tokens a draft model proposes: add --draft DRAFT_RUN")
    if draft is not None:
        if draft_tokens is not None and draft_tokens < 1:
            raise UserError(f"--draft-tokens must be >= 1, got {draft_tokens}")
        for given_option, name in ((beams is not None, "--beams"), (no_kv_cache, "--no-kv-cache"),
                                   (compile, "--compile")):
            if given_option:
                raise UserError(f"--draft (speculative decoding) does not combine with {name}; drop one of them")
    run = sampler.load_for_inference(run_dir, checkpoint=checkpoint, device=device, dtype=dtype)
    if beams is not None and beams > run.model.config.vocab_size:
        raise UserError(f"--beams ({beams}) is larger than the vocabulary ({run.model.config.vocab_size} ids); use fewer")

    def write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    if run.pairs and compile:
        raise UserError(f"--compile compiles a token stream's decode step; {run_dir} decodes targets for sources "
                        "(trained on pairs): drop --compile")
    if draft is not None:
        if run.pairs:
            raise UserError(f"--draft speculates on a token stream; {run_dir} decodes targets for sources (trained "
                            "on pairs): drop --draft")
        draft_run = sampler.load_for_inference(draft, device=device, dtype=dtype)
        sampler.check_draft(run, draft_run, draft)
        sampler.sample_speculative(run, draft_run, prompt, num_samples, sc,
                                   4 if draft_tokens is None else draft_tokens, write=write)
    elif run.pairs:
        sampler.sample_targets(run, prompt, num_samples, sc, beams or 0,
                               1.0 if length_penalty is None else length_penalty, write=write)
    elif beams is not None:
        raise UserError(f"--beams decodes a target for a source: {run_dir} was trained on a token stream, not pairs; "
                        "drop --beams")
    else:
        sampler.sample(run, prompt, num_samples, sc, write=write)


@app.command("import")
def import_(
    source: str = typer.Argument(..., help="a Hugging Face model folder (config.json + model.safetensors, sharded "
                                 "safetensors or pytorch_model.bin) or a hub id such as gpt2"),
    out: Path = typer.Option(..., help="the run folder to write (ckpt.pt, config.toml): a new or empty folder"),
    dtype: str = typer.Option("auto", help="auto (keep the file's dtype) | float32 | bfloat16"),
):
    """Import GPT-2, Llama, Mistral or Qwen3 weights and tokenizer from Hugging Face as a minigpt run: sample,
    attention, inspect, eval and bench sample use it; init.from fine-tunes it."""
    from interop.convert import import_model

    import_model(source, out, dtype, log=lambda s: typer.echo(s, err=True))


@app.command()
def export(
    run: Path = typer.Argument(..., help="a run folder written by `minigpt train` or `minigpt import`, or one of its "
                               ".pt files"),
    out: Path = typer.Option(..., help="the Hugging Face folder to write: a new or empty folder"),
    checkpoint: Optional[str] = typer.Option(None, help="latest (ckpt.pt) | best (best.pt) (default: latest)"),
):
    """Export a run as a Hugging Face model folder (GPT2LMHeadModel, LlamaForCausalLM, MistralForCausalLM or
    Qwen3ForCausalLM, with its tokenizer) that AutoModelForCausalLM and AutoTokenizer load with no code of ours."""
    from interop.convert import export_run

    export_run(run, out, checkpoint, log=lambda s: typer.echo(s, err=True))


@app.command()
def attention(
    run: Path = typer.Argument(..., help="a run folder written by `minigpt train`, or one of its .pt files"),
    out: Path = typer.Option(..., help="folder to write attention.png/.svg/.html, heads.json and lens.png into"),
    prompt: Optional[str] = typer.Option(None, help="the text to look at (a pairs run: the source)"),
    prompt_file: Optional[Path] = typer.Option(None, help="read the prompt from this file"),
    probe: Optional[str] = typer.Option(None, help="induction: random tokens repeated, sized to the context, in "
                                        "place of a prompt"),
    target: Optional[str] = typer.Option(None, help="a pairs run's target (default: decoded greedily)"),
    layer: Optional[int] = typer.Option(None, help="draw this layer only (0-based)"),
    head: Optional[int] = typer.Option(None, help="draw this head only (0-based); with --layer, one map at full size"),
    aggregate: Optional[str] = typer.Option(None, help="mean | max | rollout: one map per layer instead of per head"),
    stack: Optional[str] = typer.Option(None, help="an encoder-decoder's decoder | encoder | cross (default: all "
                                        "three)"),
    checkpoint: Optional[str] = typer.Option(None, help="latest (ckpt.pt) | best (best.pt) (default: latest)"),
    device: str = typer.Option("auto", help="auto | cpu | cuda | cuda:N | mps"),
):
    """What every head attends to: maps (attention.png/.svg), an interactive page (attention.html), a score card
    per head (heads.json and a table), and the logit lens (lens.png and a table)."""
    import attention_maps

    attention_maps.attention_run(run, out, prompt, prompt_file, probe, target, checkpoint, device, layer, head,
                                 aggregate, stack, write=typer.echo)


@app.command("eval")
def eval_(
    run: Path = typer.Argument(..., help="a run folder written by `minigpt train`, or one of its .pt files"),
    data: Optional[Path] = typer.Option(None, help="the dataset to evaluate on [default: the one the run trained on]"),
    split: str = typer.Option("val", help="val | train | length (generated tasks: longer inputs than train's)"),
    beams: Optional[int] = typer.Option(None, help="decode with beam search, keeping the best of this many beams "
                                        "(pairs) [default: greedy]"),
    length_penalty: Optional[float] = typer.Option(None, help="beam search ranks hypotheses by log-probability / "
                                                   "length^A [default: 1]"),
    max_examples: Optional[int] = typer.Option(None, help="only the first N pairs, or token-stream windows"),
    out: Optional[Path] = typer.Option(None, help="write each pair's source, reference, prediction and correct as "
                                       "JSON lines to this file"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object instead of the table"),
    checkpoint: Optional[str] = typer.Option(None, help="latest (ckpt.pt) | best (best.pt) [default: latest]"),
    device: str = typer.Option("auto", help="auto | cpu | cuda | cuda:N | mps"),
    lengths: Optional[str] = typer.Option(None, help="score the same tokens with a context of each length, past "
                                          "block_size too: e.g. 64,128,256,512"),
    stride: Optional[int] = typer.Option(None, help="with --lengths: windows advance by S tokens, scoring their last S "
                                         "[default: non-overlapping windows]"),
    per_position: bool = typer.Option(False, "--per-position", help="with --lengths: also the loss by position in "
                                      "the window"),
    max_tokens: Optional[int] = typer.Option(None, help="score only the first N tokens of the val split in each "
                                             "evaluation (default: all of it)"),
    rope_scaling: Optional[str] = typer.Option(None, help="stretch RoPE for this evaluation: linear | ntk | yarn"),
    rope_factor: Optional[float] = typer.Option(None, help="with --rope-scaling: by this factor (>= 1)"),
):
    """Score a run on a dataset split: exact match, token accuracy, BLEU, chrF and loss of its targets for pairs;
    loss, perplexity and bits per byte on a token stream, or with --lengths for each context length."""
    import json

    import evaluation

    result = evaluation.evaluate_run(run, data, split, beams, length_penalty, max_examples, out, checkpoint, device,
                                     lengths=lengths, stride=stride, per_position=per_position, max_tokens=max_tokens,
                                     rope_scaling=rope_scaling, rope_factor=rope_factor)
    typer.echo(json.dumps(result) if as_json else evaluation.format_result(result, run))


@app.command()
def positions(
    target: Path = typer.Argument(..., help="a TOML config, or a run folder (or one of its .pt files) for its learned "
                                  "position table"),
    set_: List[str] = typer.Option([], "--set", help="override a config key: --set model.rope_theta=500000 "
                                   "(repeatable)"),
    out: Path = typer.Option(..., "--out", help="folder for the PNGs (created if missing)"),
):
    """Draw the positional encodings as PNGs: the sinusoidal table and how alike its positions are, a trained run's
    learned table likewise, RoPE's score by relative offset and ALiBi's bias for each head."""
    import position_plots

    position_plots.check_out_dir(out)
    cfg, checkpoint = config_from(target, set_, read_only=True)
    lines, notes = position_plots.write_position_plots(cfg.model, checkpoint, out)
    for line in lines + [f"note: {n}" for n in notes]:
        typer.echo(line)


@app.command()
def inspect(
    target: Path = typer.Argument(..., help="a TOML config, or a run folder containing ckpt.pt"),
    set_: List[str] = typer.Option([], "--set", help="override a config key: --set model.n_kv_head=2 (repeatable)"),
    batch_size: Optional[int] = typer.Option(None, help="sequences per micro-batch [default: train.batch_size]"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object instead of the table"),
):
    """Show what a model costs before training it: parameters, FLOPs, KV cache (and an encoder-decoder's
    cross-attention cache) and activation memory."""
    import json

    from errors import UserError

    import inspection
    import train as trainer

    cfg, _ = config_from(target, set_, read_only=True)
    vocab_was_set = cfg.model.vocab_size != 0
    cfg, note = trainer.with_vocab(cfg)
    notes = [note] if note and not vocab_was_set else []
    if batch_size is not None and batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {batch_size}")
    try:
        report = inspection.inspect_model(cfg.model, batch_size or cfg.train.batch_size, cfg.run.dtype, notes,
                                             device=cfg.run.device)
    except ValueError as e:
        raise UserError(f"cannot build this model: {e}") from None
    typer.echo(json.dumps(report, indent=2) if as_json else inspection.format_report(report))


@app.command()
def plot(
    runs: List[Path] = typer.Argument(..., help="run folders written by `minigpt train` (one or more)",
                                      metavar="RUN"),
    out: Path = typer.Option(..., "--out", help="the picture to write: FILE.png or FILE.svg"),
    x: str = typer.Option("step", "--x", help="step | tokens | time (training wall time, summed across resumes)"),
    smooth: int = typer.Option(1, "--smooth", help="plot the train loss as the mean of the last W records "
                               "(1 = raw)", metavar="W"),
    log: bool = typer.Option(False, "--log", help="logarithmic loss axis"),
):
    """Draw the train and val loss of runs from their metrics.jsonl; several runs are named by what differs
    between their configs."""
    import plots

    typer.echo(f"wrote {plots.plot_runs(runs, out, x=x, window=smooth, log=log)}")


@app.command()
def sweep(
    config: Path = typer.Argument(..., help="a TOML config; a sweep table in it (vary, seeds, lengths, "
                                  "rope_scalings, rope_factor, max_tokens) gives the defaults of the options below"),
    set_: List[str] = typer.Option([], "--set", help="override a config key for every run: --set train.max_iters=500 "
                                   "(repeatable)"),
    vary: List[str] = typer.Option([], "--vary", help="KEY=V1,V2,...: train with each value; several --vary: every "
                                   "combination", metavar="KEY=V1,V2"),
    seeds: Optional[int] = typer.Option(None, "--seeds", help="runs per combination, seeded run.seed, run.seed + 1, "
                                        "... (default 1)"),
    lengths: Optional[str] = typer.Option(None, help="also score every run with a context of each length, e.g. "
                                          "64,128,256,512 (minigpt eval --lengths)"),
    rope_scaling: Optional[str] = typer.Option(None, "--rope-scaling", help="with --lengths: extra rows for the RoPE "
                                               "runs scored with these scalings, e.g. linear,ntk,yarn"),
    rope_factor: Optional[float] = typer.Option(None, help="with --rope-scaling: by this factor (>= 1)"),
    max_tokens: Optional[int] = typer.Option(None, help="score only the first N tokens of the val split in each "
                                             "evaluation (default: all of it)"),
    out: Path = typer.Option(..., "--out", help="the sweep's folder: runs/<name>/ for each run, results.md, "
                             "results.json, loss.png, lengths.png"),
):
    """Train every combination of --vary values (and --seeds seeds each), evaluate every run and tabulate the mean
    and spread over seeds. Killed or stopped, the same command continues: finished runs are not trained again."""
    import sweep as sweeps

    plan = sweeps.plan_sweep(config, set_, vary, out, seeds=seeds, lengths=lengths, rope_scaling=rope_scaling,
                             rope_factor=rope_factor, max_tokens=max_tokens)
    sweeps.run_sweep(plan, log=typer.echo)


bench_app = typer.Typer(no_args_is_help=True, help="Measure training and sampling speed after warm-up.")
app.add_typer(bench_app, name="bench")


def echo_result(title: str, result: dict, as_json: bool) -> None:
    import json

    import bench

    typer.echo(json.dumps(result) if as_json else bench.format_table(title, result))


@bench_app.command("train")
def bench_train(
    config: Path = typer.Argument(..., help="a TOML config (or a run folder, for its config)"),
    set_: List[str] = typer.Option([], "--set", help="override a config key, e.g. --set run.compile=true"),
    steps: int = typer.Option(20, help="timed optimizer steps"),
    warmup: int = typer.Option(5, help="untimed steps first (compilation happens here)"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
):
    """ms/step, tokens/s, TFLOP/s, MFU and peak memory of the configured training step; on a pairs dataset also ms
    and FLOPs per target token, and an encoder-decoder beside the decoder-only model of its width and depth."""
    from errors import UserError

    import bench

    if steps < 1 or warmup < 0:
        raise UserError(f"--steps must be >= 1 and --warmup >= 0, got {steps} and {warmup}")
    cfg, _ = config_from(config, set_, read_only=True)
    echo_result(f"bench train {config}", bench.bench_train(cfg, steps, warmup), as_json)


@bench_app.command("prepare")
def bench_prepare(
    folder: Path = typer.Argument(..., help="a folder of .txt documents"),
    generate_mb: Optional[int] = typer.Option(None, help="first fill FOLDER with copies of tiny-Shakespeare (a "
                                              "file each) up to this many MB"),
    input: Optional[Path] = typer.Option(None, "--input", help="the text --generate-mb copies (default: the "
                                         "tiny-Shakespeare corpus, downloaded once)"),
    workers: Optional[int] = typer.Option(None, help="prepare's --workers (default: one per core)"),
    repeats: int = typer.Option(1, help="runs of each, alternating; the medians are compared"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
):
    """`minigpt prepare FOLDER --tokenizer gpt2` against tiktoken's own encode_ordinary_batch on all cores over the
    same documents, in one run: MB/s, the ratio, token counts and prepare's peak memory over all its processes."""
    import json

    import bench
    import sources
    from errors import UserError

    if repeats < 1:
        raise UserError(f"--repeats must be at least 1, got {repeats}")
    if input is not None and not input.is_file():
        raise UserError(f"--input {input} is not a file; pass the text --generate-mb should copy")
    if generate_mb is not None:
        if generate_mb < 1:
            raise UserError(f"--generate-mb must be at least 1, got {generate_mb}")
        text = input or sources.shakespeare_file(None, sources.DATA_ROOT, lambda s: typer.echo(s, err=True))
        n = bench.write_repeated_corpus(folder, text, generate_mb * 10**6)
        typer.echo(f"{folder}: {n} documents", err=True)
    result = bench.bench_prepare(folder, workers, repeats, log=lambda s: typer.echo(s, err=True))
    typer.echo(json.dumps(result, indent=2) if as_json else bench.format_prepare(result))


@bench_app.command("sample")
def bench_sample(
    target: Path = typer.Argument(..., help="a run folder (its trained model) or a TOML config (random weights)"),
    set_: List[str] = typer.Option([], "--set", help="override a config key (configs only)"),
    batch: int = typer.Option(1, help="sequences decoded together"),
    prompt_len: int = typer.Option(64, help="prompt tokens to prefill"),
    new_tokens: int = typer.Option(200, help="tokens to decode"),
    device: Optional[str] = typer.Option(None, help="auto | cpu | cuda | cuda:N | mps (default: a config's "
                                         "run.device, auto for a run)"),
    dtype: str = typer.Option("auto", help="auto | float32 | bfloat16 | float16: the weights' dtype while decoding, "
                              "as sample --dtype"),
    compile: bool = typer.Option(False, "--compile", help="torch.compile the cached decode step (timed after it)"),
    draft: Optional[Path] = typer.Option(None, "--draft", help="a smaller run with the same tokenizer: time plain "
                                         "against speculative decoding (greedy and sampled) and report the draft's "
                                         "acceptance"),
    draft_tokens: Optional[int] = typer.Option(None, "--draft-tokens", help="tokens the draft proposes per check "
                                               "[default: 4]"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
):
    """Prefill ms and decode tokens/s, with and without the KV cache; with --draft, tokens/s plain and speculative,
    the speed-up and the draft's acceptance rate."""
    import torch

    from errors import UserError

    import bench
    import sample as sampler
    import train as trainer
    from model import GPT
    from runtime import resolve_device

    if batch < 1 or prompt_len < 1 or new_tokens < 2:
        raise UserError("--batch and --prompt-len must be >= 1, --new-tokens >= 2")
    if draft_tokens is not None and draft is None:
        raise UserError("--draft-tokens is how many tokens a draft model proposes: add --draft DRAFT_RUN")
    if draft is not None:
        if draft_tokens is not None and draft_tokens < 1:
            raise UserError(f"--draft-tokens must be >= 1, got {draft_tokens}")
        if batch != 1 or compile:
            raise UserError(f"--draft (speculative decoding) decodes one sequence, eagerly: drop "
                            f"{'--batch' if batch != 1 else '--compile'}")
        if not (target.is_dir() or target.suffix == ".pt"):
            raise UserError(f"--draft needs a trained run as TARGET (a run folder or .pt file) to share its "
                            f"tokenizer and to accept its tokens; {target} is a config")
    if target.is_dir() or target.suffix == ".pt":
        if set_:
            raise UserError("--set changes a config; a run's model is what it was trained as (pass a TOML config)")
        run = sampler.load_for_inference(target, device=device or "auto", dtype=dtype)
        model, rt = run.model, run.rt
        if run.pairs:
            raise UserError(f"bench sample times continuing a prompt; {target} decodes targets for sources: "
                            "`minigpt eval RUN` reports its examples/s")
    else:
        cfg, _ = config_from(target, set_, read_only=True)
        if cfg.model.arch != "decoder":
            raise UserError(f"bench sample times a decoder-only model's decode loop; {target} is an "
                            "encoder-decoder: train it and run `minigpt eval RUN`, which reports examples/s")
        cfg, _ = trainer.with_vocab(cfg)
        device = device or cfg.run.device
        resolve_device(device)  # a bad --device is a one-line error before the model is built
        torch.manual_seed(cfg.run.seed)
        model = GPT(cfg.model)
        rt = sampler.inference_runtime(model, device, dtype)
    if draft is not None:
        draft_run = sampler.load_for_inference(draft, device=device or "auto", dtype=dtype)
        sampler.check_draft(run, draft_run, draft)
        result = bench.bench_speculative(run, draft_run, prompt_len, new_tokens, 4 if draft_tokens is None
                                         else draft_tokens)
        echo_result(f"bench sample {target} --draft {draft}", result, as_json)
        return
    result = bench.bench_sample(model, rt, batch, prompt_len, new_tokens, compile=compile)
    echo_result(f"bench sample {target}", result, as_json)


@bench_app.command("nanogpt")
def bench_nanogpt(
    nanogpt_dir: Path = typer.Argument(..., help="a checkout of github.com/karpathy/nanoGPT"),
    case: List[str] = typer.Option([], "--case", help="cpu | baby | sample (repeatable); all three by default"),
    repeats: int = typer.Option(1, help="runs per case of each tool, alternating; medians are reported"),
    steps: int = typer.Option(100, help="timed training steps at nanoGPT's CPU shapes (~40 ms each)"),
    baby_steps: int = typer.Option(4, help="timed training steps at the baby-GPT shapes (~10 s each)"),
    warmup: Optional[int] = typer.Option(None, help="untimed steps first, for both tools (by default 10 for cpu, "
                                         "1 for baby)"),
    new_tokens: int = typer.Option(500, help="tokens to sample in the sample case"),
    quality: bool = typer.Option(False, "--quality", help="also train both for 2000 steps at the CPU shapes, "
                                 "evaluating every 100, and compare their val loss curves and time to nanoGPT's final "
                                 "val loss (slow: minutes per run)"),
    quality_config: List[Path] = typer.Option([], "--quality-config", help="our config for --quality, at nanoGPT's "
                                              "CPU shapes (repeatable); by default config/shakespeare_char_cpu.toml "
                                              "and config/shakespeare_char_cpu_fast.toml"),
    plot: Optional[Path] = typer.Option(None, "--plot", help="with --quality: draw both tools' val loss curves "
                                        "into this .png or .svg"),
    input: Optional[Path] = typer.Option(None, "--input", help="a local tiny-Shakespeare for nanoGPT's prepare.py, "
                                         "if its data is not prepared yet"),
    set_: List[str] = typer.Option([], "--set", help="override a key of our configs; nanoGPT gets the same shapes"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
):
    """Training and sampling speed side by side with nanoGPT, on this machine, in one run."""
    import json

    from errors import UserError

    import bench
    import plots
    import train as trainer

    unknown = [c for c in case if c not in bench.CASES]
    if unknown:
        raise UserError(f"--case takes {' | '.join(bench.CASES)}, got {', '.join(unknown)}")
    cases = case or list(bench.CASES)
    # sampling is timed as N tokens against 1, so N >= 2
    limits = {"--repeats": (repeats, 1), "--steps": (steps, 1), "--baby-steps": (baby_steps, 1),
              "--warmup": (warmup, 1), "--new-tokens": (new_tokens, 2)}
    for option, (value, least) in limits.items():
        if value is not None and value < least:
            raise UserError(f"{option} must be >= {least}, got {value}")
    if quality and "cpu" not in cases:
        raise UserError("--quality trains at the CPU shapes: include --case cpu")
    if quality_config and not quality:
        raise UserError("--quality-config picks our configs for --quality: add --quality")
    missing = [str(p) for p in quality_config if not p.is_file()]
    if missing:
        raise UserError(f"--quality-config {missing[0]} is not a file")
    if plot is not None:
        if not quality:
            raise UserError("--plot draws the val loss curves of --quality: add --quality")
        plots.check_out(plot, "--plot")  # a bad path refused now, not after minutes of training
    if input is not None and not input.is_file():
        raise UserError(f"--input {input} is not a file")

    def load(path: Path, overrides: list[str]) -> trainer.Config:
        return config_from(path, overrides)[0]

    result = bench.compare_with_nanogpt(nanogpt_dir, load, cases, repeats, {"cpu": steps, "baby": baby_steps}, warmup,
                                        new_tokens, quality, input, set_, quality_config,
                                        log=lambda s: typer.echo(s, err=True))
    if plot is not None:
        plots.plot_quality(result["quality"], plot)
    typer.echo(json.dumps(result) if as_json else bench.format_comparison(result))
