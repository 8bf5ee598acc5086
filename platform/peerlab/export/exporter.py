"""A checkpoint as a Hugging Face folder: `export_checkpoint(checkpoint_or_run, out)`.

The folder holds

    config.json                  PeerlabConfig: the run's model_config keys (mla/peer/moe/pkm sections as dicts),
                                 with auto_map naming the two files below
    configuration_peerlab.py     standalone (torch and transformers only), copied from this package
    modeling_peerlab.py          standalone: MLA with its latent cache, PEER, dense, MoE and PKM layers
    model.safetensors            the weights under peerlab's own names (`model.` before all but lm_head);
                                 model-0000k-of-0000n.safetensors and an index where larger than max_shard_size
    generation_config.json       end-of-text as eos and pad: greedy `generate` stops where peerlab's does
    tokenizer files              the run's tokenizer (`save_pretrained`)
    README.md                    the model card: config, data mix, tokens, held-out bits per byte, lm-eval results

so that `AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)` and
`AutoTokenizer.from_pretrained(out)` load it where peerlab is not installed. The folder is
written next to `out` under a temporary name and renamed into place when complete.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
import yaml

EXPORT_DIR = Path(__file__).resolve().parent
STANDALONE = ("configuration_peerlab.py", "modeling_peerlab.py")


class ExportError(ValueError):
    """An export that cannot start (not a checkpoint, a damaged one, an output folder in use): one line."""


def hf_config(model_config, tokenizer=None, dtype: torch.dtype = torch.float32):
    """The PeerlabConfig of a peerlab ModelConfig (with the tokenizer's end-of-text as bos/eos/pad, weights in `dtype`)."""
    from peerlab.config import ffn_type, to_dict
    from peerlab.data.tokenizer import eos_id
    from peerlab.export.configuration_peerlab import PeerlabConfig

    m = to_dict(model_config)
    eos = eos_id(tokenizer) if tokenizer is not None else None
    bos = tokenizer.bos_token_id if tokenizer is not None and tokenizer.bos_token_id is not None else eos
    return PeerlabConfig(
        vocab_size=m["vocab_size"],
        hidden_size=m["hidden_size"],
        num_hidden_layers=m["num_hidden_layers"],
        num_attention_heads=m["num_attention_heads"],
        intermediate_size=m["intermediate_size"],
        max_position_embeddings=m["max_position_embeddings"],
        initializer_range=m["initializer_range"],
        layer_norm_eps=m["layer_norm_eps"],
        peer_start_layer=m["peer_start_layer"],
        ffn_type=ffn_type(model_config),
        mla_config=m["mla_config"],
        peer_config=m["peer_config"],
        moe_config=m["moe_config"],
        pkm_config=m["pkm_config"],
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=eos,
        dtype=str(dtype).removeprefix("torch."),
        architectures=["PeerlabForCausalLM"],
    )


def hf_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """peerlab's parameter names as the exported model's: `model.` before everything but the LM head."""
    return {(k if k.startswith("lm_head.") else f"model.{k}"): v for k, v in state.items()}


def _keep_clear_of(out: Path, protected: list[Path]) -> None:
    """ExportError where writing `out` (even with --overwrite) would replace one of `protected`."""
    for path in protected:
        if path == out or path.is_relative_to(out):
            raise ExportError(f"output folder {out} holds {path}; choose another --out")


def _check_output(out: Path, overwrite: bool, protected: list[Path]) -> None:
    _keep_clear_of(out, protected)
    if out.exists() and not out.is_dir():
        raise ExportError(f"output {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ExportError(f"output folder {out} exists and is not empty; pass --overwrite to replace it")


def export_checkpoint(
    path: str | Path,
    out: str | Path,
    overwrite: bool = False,
    max_shard_size: str | int = "2GB",
    tokenizer: str | None = None,
) -> Path:
    """Export the checkpoint `path` names (a checkpoint folder, or a run's newest) to the folder `out`.

    The tokenizer is the run's dataset_config.tokenizer_name, or `tokenizer` (a name or folder:
    where the run named a relative folder that is elsewhere now). ExportError (one line) for a path
    that is not a checkpoint, a checkpoint that does not match its manifest, a run without
    resolved_config.yaml, a tokenizer that cannot be loaded, or an `out` that exists and is not
    empty (unless `overwrite`). Returns `out`.
    """
    from safetensors.torch import load_file
    from transformers import GenerationConfig

    from peerlab.config import ConfigError, config_from_dict, read_yaml
    from peerlab.data.tokenizer import TokenizerError, load_tokenizer
    from peerlab.export.modeling_peerlab import PeerlabForCausalLM
    from peerlab.train import checkpoint as ckpt

    out = Path(out).expanduser().resolve()
    try:
        folder = ckpt.resolve(path).resolve()
        manifest = ckpt.verify(folder)
    except ckpt.CheckpointError as err:
        raise ExportError(str(err)) from None
    run_dir = folder.parent.parent  # <run>/checkpoints/step-NNNNNN
    _check_output(out, overwrite, [folder, run_dir])
    if out.is_relative_to(run_dir / "checkpoints"):  # another checkpoint of the run, or a place for one
        raise ExportError(f"output folder {out} is in the run's checkpoints folder; choose another --out")
    config_path = run_dir / "resolved_config.yaml"
    if not config_path.is_file():
        raise ExportError(f"no resolved_config.yaml in {run_dir} (the run folder two levels above {folder})")
    try:
        cfg = config_from_dict(read_yaml(config_path), str(config_path))
    except ConfigError as err:
        raise ExportError(str(err)) from None
    tokenizer_name = tokenizer or cfg.dataset_config.tokenizer_name
    if Path(tokenizer_name).expanduser().is_dir():  # a tokenizer folder is read, never written over
        _keep_clear_of(out, [Path(tokenizer_name).expanduser().resolve()])
    try:
        tokenizer = load_tokenizer(tokenizer_name)
    except TokenizerError as err:
        raise ExportError(f"{err} (or name the tokenizer to export: --tokenizer NAME_OR_FOLDER)") from None

    state = hf_state_dict(load_file(folder / "model.safetensors"))
    dtype = next((t.dtype for t in state.values() if t.is_floating_point()), torch.float32)  # as trained: no cast
    config = hf_config(cfg.model_config, tokenizer, dtype)
    # On the meta device: no second copy of the weights and no initialisation; the checkpoint's tensors are assigned.
    with torch.device("meta"):
        model = PeerlabForCausalLM(config)
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as err:  # a checkpoint of another model than its run's config describes
        first = " ".join(str(err).split())[:300]
        raise ExportError(f"{folder}: the weights do not fit the run's model_config ({first})") from None
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id
    )
    config.register_for_auto_class()
    model.register_for_auto_class("AutoModelForCausalLM")

    tmp = out.with_name(out.name + ".export-tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        model.save_pretrained(tmp, max_shard_size=max_shard_size)
        for name in STANDALONE:  # save_pretrained copies them too; these are the package's own files, byte for byte
            shutil.copyfile(EXPORT_DIR / name, tmp / name)
        tokenizer.save_pretrained(tmp)
        for file in tmp.iterdir():  # save_pretrained leaves the weights readable by their owner only
            file.chmod(0o644)
        step = int(manifest["step"])
        parameters = sum(p.numel() for p in model.parameters())  # not the BatchNorm statistics of the state
        (tmp / "README.md").write_text(model_card(cfg, run_dir, step, folder, config, parameters))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # no half-written folder is left behind
        raise
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


# ------------------------------------------------------------------------------------------ the model card


def _run_numbers(run_dir: Path, step: int) -> tuple[dict, dict, list[dict], int | None]:
    """(last training record, last held-out record, lm-eval rows, their step), each at or before `step`."""
    from peerlab.tracking import read_evals, read_metrics

    records = [r for r in read_metrics(run_dir) if r.get("step", 0) <= step]
    trained = next((r for r in reversed(records) if any(k.startswith("tokens_seen/") for k in r)), {})
    heldout = next((r for r in reversed(records) if any(k.startswith("eval_bpb/") for k in r)), {})
    evals = [r for r in read_evals(run_dir) if r.get("step", 0) <= step]
    eval_step = max((r["step"] for r in evals), default=None)
    return trained, heldout, [r for r in evals if r["step"] == eval_step], eval_step


def _active(model_config, parameters: int) -> str:
    """The words that say how many parameters a token uses, where it reads only part of the experts."""
    from peerlab.model.size import active_parameters

    total, active = active_parameters(model_config)
    return f", of which {active + parameters - total:,} are used per token," if active < total else ""


def _layers(start: int, total: int, ffn: str) -> str:
    """Which layers have which feed-forward block, in words."""
    if start <= 0 or ffn.startswith("dense"):
        return f"and a {ffn} in every layer"
    dense = "layer 0" if start == 1 else f"layers 0 to {start - 1}"
    if start >= total:
        return f"and a dense GELU MLP in every layer ({ffn} layers would start at layer {start})"
    return f"a dense GELU MLP in {dense} and a {ffn} from layer {start} on"


def _number(value) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return "" if value is None else str(value)


def model_card(cfg, run_dir: Path, step: int, folder: Path, config, parameters: int) -> str:
    """README.md of an exported folder, from the run's resolved config, metrics.jsonl and evals.jsonl."""
    from peerlab.config import to_dict

    m, d, t = cfg.model_config, cfg.dataset_config, cfg.train_config
    trained, heldout, evals, eval_step = _run_numbers(run_dir, step)
    seen = {k.split("/", 1)[1]: v for k, v in trained.items() if k.startswith("tokens_seen/")}
    tokens = sum(seen.values())
    arm = config.ffn_type
    ffn = {"peer": "PEER layer (product-key retrieval of single-neuron experts)", "dense": "dense GELU MLP",
           "moe": "mixture of experts", "pkm": "product-key memory"}[arm]  # fmt: skip
    lines = [
        "---",
        "library_name: transformers",
        "pipeline_tag: text-generation",
        "tags: [peerlab, mla, " + arm + "]",
        "---",
        "",
        f"# {run_dir.name} (step {step})",
        "",
        (
            f"A decoder-only language model of {parameters:,} parameters{_active(m, parameters)} trained with "
            "peerlab: multi-head latent "
            f"attention (DeepSeek-V2) in each of its {m.num_hidden_layers} layers (hidden size {m.hidden_size}), "
            f"{_layers(m.peer_start_layer, m.num_hidden_layers, ffn)}."
        ),
        "",
        f"Exported from `{folder}`.",
        "",
        "## Use",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        'model = AutoModelForCausalLM.from_pretrained("PATH", trust_remote_code=True)',
        'tokenizer = AutoTokenizer.from_pretrained("PATH")',
        'ids = tokenizer("The", return_tensors="pt").input_ids',
        "print(tokenizer.decode(model.generate(ids, max_new_tokens=20)[0]))",
        "```",
        "",
        (
            "The modeling code (`modeling_peerlab.py`) needs only torch and transformers. In evaluation mode "
            "(what `from_pretrained` returns) the query BatchNorm of PEER and PKM layers uses its running statistics."
        ),
        "",
        (
            "lm-eval's own `hf` model scores it as peerlab scored the run (below) with the run's context length: "
            f"`lm_eval --model hf --model_args pretrained=PATH,trust_remote_code=True,max_length={d.max_seq_length} "
            "--tasks ...`."
        ),
        "",
        "## Training",
        "",
        f"- steps: {step}" + (f" of {t.max_steps}" if t.max_steps else "") + (f"; tokens: {tokens:,}" if seen else ""),
        (
            f"- sequence length {d.max_seq_length}, batch {t.per_device_train_batch_size} per device x "
            f"{t.gradient_accumulation_steps} accumulation, learning rate {t.learning_rate} ({t.lr_scheduler_type})"
        ),
        f"- tokenizer: `{d.tokenizer_name}` ({m.vocab_size} tokens)",
        "",
        "### Data mix",
        "",
        "| dataset | path | weight | tokens seen |",
        "|---|---|---|---|",
    ]
    total_weight = sum(e.weight for e in d.datasets) or 1.0
    for e in d.datasets:
        lines.append(f"| {e.name} | `{e.path}` | {e.weight / total_weight:.3f} | {_number(seen.get(e.name))} |")
    lines += ["", "## Held-out bits per byte", ""]
    bpb = {k.split("/", 1)[1]: v for k, v in heldout.items() if k.startswith("eval_bpb/")}
    if bpb:
        lines += [f"At step {heldout.get('step')} (lower is better):", "", "| dataset | bits per byte |", "|---|---|"]
        lines += [f"| {name} | {value:.4f} |" for name, value in sorted(bpb.items())]
    else:
        lines.append("The run logged no held-out evaluation up to this step.")
    lines += ["", "## lm-eval", ""]
    if evals:
        lines += [f"At step {eval_step}:", "", "| task | metric | value | stderr |", "|---|---|---|---|"]
        lines += [
            f"| {r['task']} | {r['metric']} | {_number(r['value'])} | {_number(r.get('stderr'))} |" for r in evals
        ]
    else:
        lines.append("The run logged no lm-eval results up to this step.")
    model_yaml = yaml.safe_dump({"model_config": to_dict(m)}, sort_keys=False, default_flow_style=None)
    lines += ["", "## Config", "", "The run's model_config (resolved_config.yaml):", "", "```yaml", model_yaml.rstrip()]
    lines += ["```", ""]
    return "\n".join(lines)
