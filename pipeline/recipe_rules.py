"""The problems a recipe can have, found before anything runs (pipeline.recipe collects them):
the `Problem` record and its message helpers, values that are not JSON at all (`json_problems`),
registry names (parts, trunk refusals, quantization schemes and roles) and the rules that involve
more than one field (`cross_field_problems`). Each problem names its dotted location(s), so the
loader can blame the `--set` flag or the file that set the bad value.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from dataclasses import dataclass

from pipeline import config as C
from pipeline.errors import UserError

SHOW = 60  # longest value shown in a message


@dataclass(frozen=True)
class Problem:
    locs: tuple[tuple, ...]  # the dotted locations it concerns (a flag setting one gets the blame)
    text: str  # "path: what is wrong. The fix."



class TooLarge(Exception):
    """A raw value too large to validate (YAML aliases can expand a few lines without bound)."""



def show(value) -> str:
    """repr(value), shortened for a one-line message."""
    text = repr(value)
    return text if len(text) <= SHOW else text[:SHOW - 3] + "..."


def dotted(loc: Iterable) -> str:
    return ".".join(str(p) for p in loc) or "<recipe>"


def problem(locs: Iterable[str], text: str) -> Problem:
    """A problem about the dotted paths `locs` (e.g. "train.seq_len")."""
    return Problem(tuple(tuple(loc.split(".")) for loc in locs), text)


MAX_NODES = 100_000  # far above any recipe; YAML aliases can make a few lines expand without bound


def json_problems(value, loc: tuple, path_ids: tuple = (), budget: list | None = None) -> list[Problem]:
    """Values the schema cannot even be asked about: not JSON (an explicit YAML tag such as
    !!binary or !!set), text with a NUL or an unpaired surrogate (not UTF-8), non-string keys,
    and YAML aliases that make a value contain itself or expand past MAX_NODES."""
    budget = [MAX_NODES] if budget is None else budget
    budget[0] -= 1
    if budget[0] < 0:
        raise TooLarge(Problem((loc,), f"{dotted(loc)}: the value is too large (over {MAX_NODES} items)."))
    if isinstance(value, (dict, list)):
        if id(value) in path_ids:
            return [Problem((loc,), f"{dotted(loc)}: the value contains itself (a YAML alias to its own anchor).")]
        path_ids = (*path_ids, id(value))
    if isinstance(value, dict):
        out = []
        for k, v in value.items():
            if not isinstance(k, str):
                out.append(Problem(((*loc, str(k)),), f"{dotted((*loc, k))}: keys must be names, got {show(k)}."))
            else:
                out += json_problems(v, (*loc, k), path_ids, budget)
        return out
    if isinstance(value, list):
        return [p for i, v in enumerate(value) for p in json_problems(v, (*loc, i), path_ids, budget)]
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return [Problem((loc,), f"{dotted(loc)}: {show(value)} is not valid UTF-8 text.")]
        if "\x00" in value:
            return [Problem((loc,), f"{dotted(loc)}: {show(value)} contains a NUL character.")]
        return []
    if value is None or isinstance(value, (bool, int, float)):
        return []
    return [Problem((loc,), f"{dotted(loc)}: a YAML {type(value).__name__} value ({show(value)}) is not a "
                             f"recipe value; write a number, a string, true/false, a list or a mapping.")]


def without(value, bad: set[tuple]):
    """A copy of `value` without the entries at the locations in `bad` (so it dumps as JSON)."""
    def walk(v, loc):
        if isinstance(v, dict):
            return {k: walk(x, (*loc, k)) for k, x in v.items() if isinstance(k, str) and (*loc, k) not in bad}
        if isinstance(v, list):
            return [walk(x, (*loc, i)) for i, x in enumerate(v) if (*loc, i) not in bad]
        return v
    return walk(value, ())



def registry_problems(data: dict) -> tuple[list[Problem], set[tuple]]:
    """Part names resolved by the model registry (its message carries a did-you-mean), and the
    `model:` keys the recipe's trunk does not implement: (problems, locations of refused keys)."""
    from pipeline.model import compose, registry

    model = data.get("model") if isinstance(data.get("model"), dict) else {}
    defaults = C.ModelConfig.__dataclass_fields__
    out: list[Problem] = []
    trunk_name = model.get("trunk", defaults["trunk"].default)
    trunk = None
    if isinstance(trunk_name, str):
        try:
            trunk = registry.part("trunk", trunk_name)
        except UserError as e:
            out.append(problem(["model.trunk"], str(e)))
    refused = compose.refusals(trunk.name, model) if trunk is not None else {}
    out += [problem([f"model.{key}"], text) for key, text in refused.items()]
    kinds = trunk.kinds if trunk is not None else tuple(registry.SLOT_FIELDS)
    for kind in kinds:
        field_name = registry.SLOT_FIELDS[kind]
        value = model.get(field_name, defaults[field_name].default)
        if isinstance(value, str) and value != registry.NO_PART.get(kind):
            try:
                registry.part(kind, value)
            except UserError as e:
                out.append(problem([f"model.{field_name}"], str(e)))
    return out, {("model", key) for key in refused}


def scheme_problems(data: dict) -> list[Problem]:
    """Quantization scheme and role names of every rule list (the codec's scheme registry and
    pipeline.model.roles), with a did-you-mean."""
    from pipeline.export.codec import selectable_schemes
    from pipeline.model.roles import ROLES

    quant = data.get("quant") if isinstance(data.get("quant"), dict) else {}
    lists = [("quant.rules", quant.get("rules"))]
    compare = quant.get("compare") if isinstance(quant.get("compare"), list) else []
    lists += [(f"quant.compare.{i}.rules", c.get("rules")) for i, c in enumerate(compare) if isinstance(c, dict)]
    schemes = selectable_schemes()
    out = []
    for where, rules in lists:
        for i, rule in enumerate(rules if isinstance(rules, list) else []):
            if not isinstance(rule, dict):
                continue
            scheme = rule.get("scheme")
            if isinstance(scheme, str) and scheme not in schemes:
                close = difflib.get_close_matches(scheme, schemes, n=1)
                hint = f" Did you mean {close[0]!r}?" if close else ""
                out.append(problem([f"{where}.{i}.scheme"], f"{where}.{i}.scheme: {show(scheme)} is not a "
                                    f"quantization scheme; one of {', '.join(schemes)}.{hint}"))
            roles = rule.get("roles")
            for j, role in enumerate(roles if isinstance(roles, list) else []):
                if isinstance(role, str) and role not in ROLES:
                    close = difflib.get_close_matches(role, ROLES, n=1)
                    hint = f" Did you mean {close[0]!r}?" if close else ""
                    out.append(problem([f"{where}.{i}.roles.{j}"], f"{where}.{i}.roles.{j}: {show(role)} is not "
                                        f"a parameter role; one of {', '.join(ROLES)}.{hint}"))
    return out


def cross_field_problems(r: C.Recipe, bad: set[str]) -> list[Problem]:
    """Rules that involve more than one field, on a recipe whose schema validated. A rule is
    skipped while a field it reads breaks its own constraint (that one is reported instead)."""
    out: list[Problem] = []

    def ok(*paths: str) -> bool:
        return not any(b == p or b.startswith(p + ".") for b in bad for p in paths)

    def add(paths: list[str], text: str) -> None:
        out.append(problem(paths, text))

    m, t, e, ttt = r.model, r.train, r.eval, r.ttt

    # Training batches: each of the reference ranks gets whole sequences every micro-step
    # (pipeline/stages/train.py splits batch_tokens over reference_world_size, then seq_len).
    bt, sl, ref = "train.batch_tokens", "train.seq_len", "train.reference_world_size"
    if ok(bt, sl, ref):
        unit = t.seq_len * t.reference_world_size
        if t.batch_tokens % unit:
            add([bt, sl, ref], f"{bt} ({t.batch_tokens}) must be a multiple of {sl} ({t.seq_len}) x {ref} "
                               f"({t.reference_world_size}) = {unit}, so every reference rank gets whole sequences.")
        elif t.micro_batch_seqs and ok("train.micro_batch_seqs") \
                and (t.batch_tokens // unit) % t.micro_batch_seqs:
            per_rank = t.batch_tokens // unit
            add([bt, sl, ref, "train.micro_batch_seqs"],
                f"train.micro_batch_seqs ({t.micro_batch_seqs}) must be 0 (off) or divide the {per_rank} sequences "
                f"each rank runs per micro-step ({bt} / ({sl} x {ref})).")

    # Attention heads (pipeline/model/base.py head_dim).
    d, h, kv = "model.model_dim", "model.num_heads", "model.num_kv_heads"
    heads_ok = ok(d, h, kv) and not (m.model_dim % m.num_heads or m.num_heads % m.num_kv_heads)
    if ok(d, h, kv) and not heads_ok:
        add([d, h, kv], f"model: model_dim {m.model_dim} must divide by num_heads {m.num_heads}, and num_heads "
                        f"by num_kv_heads {m.num_kv_heads}.")

    # Each chosen part's own rules (RoPE dims, MHA-only attention, feed-forward widths, sidecar
    # sites, ...), declared with the part (pipeline.model.registry `check=`).
    from pipeline.model.compose import cross_field_problems
    from pipeline.model.registry import SLOT_FIELDS

    if ok("model.trunk", *(f"model.{f}" for f in SLOT_FIELDS.values())):  # every part name resolved
        for paths, text in cross_field_problems(m, ok):
            add(paths, text)

    # Muon's Polar Express tuples are tuned for five iterations (pipeline/optim/muon_variants.py).
    if r.optim.muon_ns_coeffs == "polar_express" and ok("optim.muon_ns_steps") and r.optim.muon_ns_steps > 5:
        add(["optim.muon_ns_steps", "optim.muon_ns_coeffs"],
            f"optim.muon_ns_steps ({r.optim.muon_ns_steps}): Polar Express has 5 tuned iterations; set 1 to 5, or "
            "optim.muon_ns_coeffs: jordan.")

    # Evaluation windows (eval/windows.py) and the validation cap (pipeline/stages/evaluate.py).
    if ok("eval.stride", "eval.seq_len") and e.stride > e.seq_len:
        add(["eval.stride", "eval.seq_len"], f"eval.stride ({e.stride}) must be at most eval.seq_len ({e.seq_len}); "
                                             "each window moves by stride tokens.")
    if r.data.max_val_tokens and ok("data.max_val_tokens", "eval.seq_len") and r.data.max_val_tokens < e.seq_len:
        add(["data.max_val_tokens", "eval.seq_len"],
            f"data.max_val_tokens ({r.data.max_val_tokens}) must be 0 (all) or at least eval.seq_len ({e.seq_len}): "
            "evaluation needs one whole window.")

    # Test-time training (eval/ttt.py), only when it runs.
    if ttt.enabled:
        if ttt.mode == "score_first" and ok("ttt.chunk_tokens", "eval.seq_len") and ttt.chunk_tokens < e.seq_len:
            add(["ttt.chunk_tokens", "eval.seq_len"],
                f"ttt.chunk_tokens ({ttt.chunk_tokens}) must be at least eval.seq_len ({e.seq_len}): TTT trains on "
                "whole sequences cut from each chunk.")
        if ttt.mode == "phased_lora" and ok("ttt.lora_chunk_tokens", "eval.seq_len") \
                and ttt.lora_chunk_tokens > e.seq_len:
            add(["ttt.lora_chunk_tokens", "eval.seq_len"],
                f"ttt.lora_chunk_tokens ({ttt.lora_chunk_tokens}) must be at most eval.seq_len ({e.seq_len}): each "
                "chunk is scored inside one window of its document.")
        if ttt.mode == "score_first" and e.mode == "pr298_all_positions":
            add(["ttt.mode", "eval.mode"], "eval.mode pr298_all_positions scores tokens many times, and score-first "
                                           "TTT needs each scored once; use eval.mode sliding or nonoverlap.")
        blocks = {"unet_gpt": ("model.num_layers", m.num_layers), "looped_gpt": ("model.num_layers", m.num_layers),
                  "depth_recurrent": ("model.recurrent.unique_layers", m.recurrent.unique_layers)}.get(m.trunk)
        if blocks and ok("ttt.freeze_blocks", blocks[0]) and ttt.freeze_blocks > blocks[1]:
            add(["ttt.freeze_blocks", blocks[0]], f"ttt.freeze_blocks ({ttt.freeze_blocks}) is more than the model's "
                                                  f"{blocks[1]} blocks ({blocks[0]}).")

    # Export plans (pipeline/export/plan.py check_quant_rules).
    from pipeline.export.codec import SCHEMES

    plans = [("quant.rules", r.quant.rules)] + [(f"quant.compare.{i}.rules", p.rules)
                                                for i, p in enumerate(r.quant.compare)]
    for where, rules in plans:
        for i, rule in enumerate(rules):
            here = f"{where}.{i}"
            scheme = SCHEMES.get(rule.scheme)
            for key in ("clip_percentile", "clip_sigmas"):
                if getattr(rule, key) is not None and scheme is not None and not scheme.takes_clip:
                    clipping = "/".join(n for n, sc in SCHEMES.items() if sc.takes_clip)
                    add([f"{here}.{key}"], f"{here}: {key} applies to {clipping} only, not {rule.scheme}; remove it.")
            if rule.clip_percentile is not None and rule.clip_sigmas is not None:
                add([f"{here}.clip_percentile", f"{here}.clip_sigmas"],
                    f"{here}: clip_percentile and clip_sigmas both set a row's clip; keep one.")
            if rule.max_numel and ok(here) and rule.min_numel > rule.max_numel:
                add([f"{here}.min_numel", f"{here}.max_numel"],
                    f"{here}: min_numel ({rule.min_numel}) > max_numel ({rule.max_numel}), so it never applies.")
    if r.quant.fit_clip is not None and not any(rule.clip_sigmas is not None for rule in r.quant.rules):
        add(["quant.fit_clip"], "quant.fit_clip widens SD-clip, but no rule in quant.rules sets clip_sigmas; "
                                "set clip_sigmas on the int6/int8 rules or remove quant.fit_clip.")
    fit = r.quant.fit_clip
    if fit is not None and ok("quant.fit_clip.margin_bytes", "package.cap_bytes") \
            and fit.margin_bytes >= r.package.cap_bytes:
        add(["quant.fit_clip.margin_bytes", "package.cap_bytes"],
            f"quant.fit_clip.margin_bytes ({fit.margin_bytes:,}) must be below package.cap_bytes "
            f"({r.package.cap_bytes:,}): the artifact must fit the cap less the margin.")
    names = [p.name for p in r.quant.compare]
    for i, name in enumerate(names):
        if name in names[:i]:
            add([f"quant.compare.{i}.name"], f"quant.compare.{i}.name: {name!r} names an earlier plan too; "
                                             "each plan's size is reported under its name.")
    return out

