"""Baseline arms (dense, MoE, PKM) next to the PEER cells, and the one rule that sizes them.

`ablate.py --baseline dense,moe,pkm --match flops` adds one setting per arm to the sweep: the
base config with `model_config.ffn_type` switched to the arm (dense: `use_peer: false`, the
setting the sweeps have always called `no_peer`), crossed with the mixes and seeds as every
other setting is. With `--match` one knob of each arm is sized so that a quantity of the WHOLE
model matches the PEER cell's within `TOLERANCE` (5%); `match_arm` is that rule.

The PEER cell is the sweep's base config (after `--set`), whose ffn_type must be peer. A grid
over PEER keys does not move the arms: they are sized once, against the base cell, and the
plan shows each arm's ratio to it.

Quantities (`--match`):

    flops    training FLOPs per token, `training_flops_per_token(model, dataset_config.max_seq_length)`
    params   all parameters (`parameter_formulas`, which tests hold against the built model)
    active   parameters a token uses (`active_parameters`: PEER's retrieved experts, MoE's
             top_k and shared experts, PKM's retrieved value rows; the rest of the model whole)

Knobs (the arm's other keys stay as the config writes them):

    dense  intermediate_size: the MLP width of every layer (the dense arm has no other kind
           of layer, so the layers before peer_start_layer change with it too)
    moe    moe_config.expert_size (num_experts, top_k and num_shared_experts as written)
    pkm    flops, active: pkm_config.num_experts_per_tok (k, at most the smaller sub-key set);
           params: pkm_config.product_key_dim [n1, n2] and num_experts = n1 * n2, the most
           square pair (n1 <= n2, n1 >= k) that matches

Attention, embeddings and the LM head are the same in every arm, so they count in both the
arm's quantity and the PEER cell's: the ratio is the one a reader of the leaderboard sees.
Each quantity grows with its knob, so the search is a bisection for the first integer at or
above the target, keeping whichever of it and its neighbour below is nearer. When no integer
is within the tolerance (a PKM whose key search alone costs more than the PEER cell, say) the
arm is refused: `MatchError`, one line naming the arm, the knob and the nearest ratio.

Without `--match` the arms run as the config writes them (dense: intermediate_size; moe:
moe_config; pkm: pkm_config), and the plan still shows their ratios to the PEER cell.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass

from peerlab.config import Config, ConfigError, ModelConfig, ffn_type
from peerlab.model.size import active_parameters, parameter_formulas, training_flops_per_token

ARMS = ("dense", "moe", "pkm")
MATCHES = ("flops", "params", "active")
TOLERANCE = 0.05
QUANTITY = {"flops": "flops_per_token", "params": "params_total", "active": "params_active"}
WORDS = {"flops": "training FLOPs per token", "params": "parameters", "active": "active parameters"}


class MatchError(ConfigError):
    """An arm no integer size brings within the tolerance of the PEER cell."""


@dataclass
class ArmSize:
    """One arm as the sweep runs it: its setting, its knob's value, its sizes and its ratio to the PEER cell."""

    arm: str  # peer (the reference), dense, moe or pkm
    setting: dict  # the sweep's setting: model_config key -> value
    knob: str  # the key that sizes it (model_config.<knob>)
    size: int | list  # the knob's value
    params_total: int
    params_active: int
    flops_per_token: int
    ratio: float  # the matched quantity (flops without --match) over the PEER cell's


def parse_arms(value, origin: str = "--baseline") -> list[str]:
    """The arms of `--baseline` or a search space's `baseline:`: true (dense), false/null (none), 'dense,moe' or a list."""
    if value is None or value is False:
        return []
    if value is True:
        return ["dense"]
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(a, str) for a in items):
        raise ConfigError(f"{origin}: expected true, an arm or a list of arms ({', '.join(ARMS)}), got {value!r}")
    arms = []
    for a in (a.strip() for a in items):
        if not a and isinstance(value, str):
            continue  # 'dense,' or a trailing comma
        if a not in ARMS:
            raise ConfigError(f"{origin}: unknown arm '{a}' (the arms are {', '.join(ARMS)}; PEER is the sweep itself)")
        if a not in arms:
            arms.append(a)
    return arms


def check_match(match, arms: list[str], origin: str = "--match") -> str | None:
    """`--match` (or `match:`): flops, params, active or none; it sizes the --baseline arms, so it needs some."""
    if match is None or match == "none":
        return None
    if match not in MATCHES:
        raise ConfigError(f"{origin}: expected one of {', '.join(MATCHES)}, got {match!r}")
    if not arms:
        raise ConfigError(f"{origin} {match}: it sizes the --baseline arms; name them (--baseline dense,moe,pkm)")
    return match


def sizes(m: ModelConfig, seq_len: int) -> dict[str, int]:
    """params_total, params_active and flops_per_token of the model `m` describes."""
    total, active = active_parameters(m)
    return {"params_total": total, "params_active": active, "flops_per_token": training_flops_per_token(m, seq_len)}


def quantity(m: ModelConfig, match: str, seq_len: int) -> int:
    """The quantity `--match` compares (flops, params or active) of the model `m` describes."""
    if match == "flops":
        return training_flops_per_token(m, seq_len)
    if match == "params":
        return sum(parameter_formulas(m).values())
    return active_parameters(m)[1]


def knob_of(arm: str, match: str | None) -> str:
    """The model_config key that sizes `arm` for `match` (module docstring)."""
    if arm == "dense":
        return "intermediate_size"
    if arm == "moe":
        return "moe_config.expert_size"
    return "pkm_config.product_key_dim" if match == "params" else "pkm_config.num_experts_per_tok"


def _get(m: ModelConfig, key: str):
    section, _, name = key.rpartition(".")
    return getattr(getattr(m, section) if section else m, name)


def _with(m: ModelConfig, key: str, value) -> ModelConfig:
    out = copy.deepcopy(m)
    section, _, name = key.rpartition(".")
    setattr(getattr(out, section) if section else out, name, value)
    if key == "pkm_config.product_key_dim":
        out.pkm_config.num_experts = value[0] * value[1]
    return out


def arm_setting(m: ModelConfig | None, arm: str) -> dict:
    """The setting that turns the base model `m` into `arm`, sized as the config writes it."""
    if arm == "dense":  # the sweeps' dense setting since the first baseline: use_peer false (no_peer)
        return {"use_peer": False} | ({"ffn_type": "dense"} if m is not None and m.ffn_type is not None else {})
    return {"ffn_type": arm} | ({"use_peer": True} if m is not None and m.use_peer is False else {})


def _arm_model(m: ModelConfig, arm: str) -> ModelConfig:
    out = copy.deepcopy(m)
    out.ffn_type, out.use_peer = arm, arm != "dense"
    return out


def _nearest(q, target: int, lo: int, hi: int | None = None) -> int:
    """The integer x in [lo, hi] whose q(x) is nearest `target`, q non-decreasing in x (hi None: no bound)."""
    if hi is None:
        hi = max(lo, 1)
        while q(hi) < target and hi < 2**48:
            hi *= 2
    if q(hi) < target:
        return hi
    a, b = lo, hi
    while a < b:  # the first x with q(x) >= target
        mid = (a + b) // 2
        if q(mid) >= target:
            b = mid
        else:
            a = mid + 1
    return min([a] + ([a - 1] if a > lo else []), key=lambda x: abs(q(x) - target))


def _pkm_keys(q, target: int, k: int) -> list[int]:
    """The most square [n1, n2] (k <= n1 <= n2) whose q is within the tolerance of `target`; else the nearest tried."""
    n1 = _nearest(lambda n: q([n, n]), target, k)
    if q([n1, n1]) > target and n1 > k:
        n1 -= 1  # the square at or below the target: n2 grows from there
    best = None
    for a in range(n1, k - 1, -1):
        b = _nearest(lambda n, a=a: q([a, n]), target, a)
        if best is None or abs(q([a, b]) - target) < abs(q(best) - target):
            best = [a, b]
        if abs(q([a, b]) / target - 1) <= TOLERANCE:
            return [a, b]
    return best


def match_arm(config: Config, arm: str, match: str | None) -> ArmSize:
    """The rule: `arm` (dense, moe, pkm) sized so that its `match` quantity (flops, params, active) is within
    TOLERANCE of the base config's PEER cell; None: as the config writes it. MatchError when no integer is."""
    m, seq_len = config.model_config, config.dataset_config.max_seq_length
    if arm not in ARMS:
        raise ConfigError(f"--baseline: unknown arm '{arm}' (the arms are {', '.join(ARMS)})")
    if match is not None and ffn_type(m) != "peer":
        raise ConfigError(
            f"--match {match}: arms are sized against the base config's PEER cell, but its model_config.ffn_type "
            f"is {ffn_type(m)}; run the sweep on a PEER base config"
        )
    knob = knob_of(arm, match)
    base = _arm_model(m, arm)
    setting = arm_setting(m, arm)
    reference = quantity(m, match or "flops", seq_len)
    if match is not None:
        q = lambda v: quantity(_with(base, knob, v), match, seq_len)
        if arm == "pkm" and match == "params":
            size = _pkm_keys(q, reference, m.pkm_config.num_experts_per_tok)
        elif arm == "pkm":
            size = _nearest(q, reference, 1, min(m.pkm_config.product_key_dim))
        else:
            size = _nearest(q, reference, 1)
        base = _with(base, knob, size)
        ratio = quantity(base, match, seq_len) / reference
        if abs(ratio - 1) > TOLERANCE:
            hint = {
                "pkm": " (a smaller pkm_config.query_dim or num_heads makes its key search cheaper)",
                "moe": "",
                "dense": "",
            }[arm]
            raise MatchError(
                f"--match {match}: the {arm} arm cannot come within {TOLERANCE:.0%} of the PEER cell's "
                f"{WORDS[match]} ({reference:,}): the nearest, {knob} = {size}, gives {ratio:.3f}x{hint}"
            )
        setting |= {knob: size} | ({"pkm_config.num_experts": size[0] * size[1]} if isinstance(size, list) else {})
    s = sizes(base, seq_len)
    ratio = s[QUANTITY[match or "flops"]] / reference
    return ArmSize(arm, setting, knob, _get(base, knob), **s, ratio=ratio)


def plan_arms(config: Config, arms: list[str], match: str | None, cells: dict[str, Config] | None = None) -> dict:
    """What sweep.json and the dry run show: the PEER cell and each arm with its size, sizes and ratio; `cells`
    ({setting label: config}), the sweep's other PEER settings, each with its ratio to the same PEER cell."""
    m, seq_len = config.model_config, config.dataset_config.max_seq_length
    peer = ArmSize("peer", {}, "", "", **sizes(m, seq_len), ratio=1.0)
    reference = getattr(peer, QUANTITY[match or "flops"])
    others = [
        ArmSize("peer", {}, "", label, **s, ratio=s[QUANTITY[match or "flops"]] / reference)
        for label, c in (cells or {}).items()
        for s in [sizes(c.model_config, c.dataset_config.max_seq_length)]
    ]
    rows = [peer, *others] + [match_arm(config, a, match) for a in arms]
    return {
        "match": match,
        "tolerance": TOLERANCE if match else None,
        "reference": "the base config's PEER cell (after --set)",
        "arms": [asdict(r) for r in rows],
    }


def plan_lines(info: dict) -> list[str]:
    """The plan's lines for the arms: a header, then one row per arm (PEER first)."""
    match = info["match"]
    how = (
        f"sized to match the {WORDS[match]} of {info['reference']} within {info['tolerance']:.0%}"
        if match
        else f"as the config writes them (no --match); ratios of training FLOPs per token to {info['reference']}"
    )
    lines = [f"baseline arms {how}:"]
    lines.append(f"  {'arm':<6} {'size':<40} {'params':>14} {'active':>14} {'FLOPs/token':>14} {'ratio':>7}")
    for r in info["arms"]:
        size = f"{r['knob']} = {_size(r['size'])}" if r["knob"] else r["size"] or "the PEER cell (the reference)"
        lines.append(
            f"  {r['arm']:<6} {size:<40} {r['params_total']:>14,} {r['params_active']:>14,} "
            f"{r['flops_per_token']:>14,} {r['ratio']:>7.3f}"
        )
    return lines


def _size(value) -> str:
    return "x".join(str(v) for v in value) if isinstance(value, list) else f"{value:,}"
