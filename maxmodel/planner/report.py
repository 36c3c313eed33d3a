"""Readable tables for a plan and for a fit."""
from __future__ import annotations

GiB = 2**30


def num(x: float | None, unit: str = "") -> str:
    if x is None:
        return "-"
    for div, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(x) >= div and x < 1e15:
            return f"{x / div:.3g}{suffix}{unit}"
    return f"{x:.3g}{unit}"


def _rows(title: str, rows: list[tuple[str, str]]) -> list[str]:
    width = max(len(k) for k, _ in rows) if rows else 0
    return [title] + [f"  {k:<{width}}  {v}" for k, v in rows] + [""]


def plan_table(p: dict) -> str:
    b, a, s, f = p["budget"], p["allocation"], p["shape"], p["flops"]
    out = _rows("budget", [("FLOPs", f"{b['flops']:.3e}  (from {b['from']})"),
                           ("law", f"{p['law']['name']}: {p['law']['source']}")])
    rows = [("parameters", f"{num(a['params'])}  ({p['law']['param_kind']})"), ("tokens", num(a["tokens"])),
            ("tokens/param", f"{a['tokens_per_param']:.1f}")]
    if a["loss"] is not None:
        rows.append(("predicted loss", f"{a['loss']:.4f}"))
    out += _rows("allocation", rows)
    if "data_constrained" in p:
        dc = p["data_constrained"]
        out += _rows("data-constrained (Muennighoff et al. 2023)", [
            ("unique tokens", num(dc["unique_tokens"])), ("epochs", f"{dc['epochs']:.2f}"),
            ("effective tokens", num(dc["effective_tokens"])),
            ("loss / if all unique", (f"{dc['loss']:.4f} / {dc['loss_if_unique']:.4f} "
                                     f"(penalty {dc['repeat_penalty']:+.4f})")),
            ("unconstrained optimum", (f"{num(dc['unconstrained']['params'])} params, "
                                      f"{dc['unconstrained']['epochs']:.2f} epochs"))])
    if "inference" in p:
        inf = p["inference"]
        out += _rows("inference-aware (Sardana et al. 2024)", [
            ("inference tokens", num(inf["inference_tokens"])),
            ("model / tokens", (f"{num(inf['params'])} trained on {num(inf['tokens'])} "
                               f"(Chinchilla: {num(inf['chinchilla']['params'])} on "
                               f"{num(inf['chinchilla']['tokens'])})")),
            ("lifetime FLOPs", (f"{inf['lifetime_flops']:.3e}, saves {inf['flops_saved']:.3e} "
                               f"({inf['flops_saved_fraction']:.1%})"))])
    out += _rows(f"shape (best of {len(p['shape_candidates'])} candidates)", [
        ("layers x d_model", f"{s['num_layers']} x {s['d_model']}  (width/depth {s['aspect']:.0f})"),
        ("heads / kv heads", f"{s['num_heads']} / {s['num_kv_heads']} of {s['head_dim']}"),
        ("d_ff", f"{s['d_ff']} ({s['activation']})"), ("vocab", str(s["vocab_size"])),
        ("parameters", (f"{num(s['params']['total'])} total, {num(s['params']['non_embedding'])} non-embedding "
                       f"({s['error']:+.2%} from target)"))])
    out.append("  candidates: " + "; ".join(
        f"{c['num_layers']}x{c['d_model']} ff{c['d_ff']} h{c['num_heads']}/{c['num_kv_heads']} "
        f"{num(c['params_total'])}" for c in p["shape_candidates"]))
    out.append("")
    out += _rows("FLOPs", [("6ND", f"{f['6ND']:.3e}"),
                           ("Chinchilla App. F", f"{f['appendix_f']:.3e} at seq_len {f['seq_len']}"),
                           ("ratio App. F / 6ND", f"{f['ratio']:.3f}")])
    if "time" in p:
        t = p["time"]
        rows = []
        if "chips_for_deadline" in p:
            rows.append(("chips for deadline", (f"{p['chips_for_deadline']['chips']} x {t['chip']} for "
                                               f"{p['chips_for_deadline']['deadline_days']:g} days")))
        if "days" in t:
            rows += [("training time", (f"{t['days']:.2f} days on {t['chips']} x {t['chip']} at MFU "
                                       f"{b['mfu']:.0%}")), ("chip-hours", num(t["chip_hours"]))]
        else:
            rows.append(("chip-days", f"{t['chip_days']:.4g} on {t['chip']} at MFU {b['mfu']:.0%}"))
        if "cost" in t:
            rows.append(("cost", f"${t['cost']:,.0f} at ${t['price_per_chip_hour']}/chip-hour"))
        out += _rows("time and cost", rows)
    if "layout" in p:
        lay = p["layout"]
        c = lay["chosen"]
        rows = [("fits", "yes" if lay["fits"] else "NO")]
        if c:
            mem = c["memory_gib"]
            rows += [("mesh", " ".join(f"{k}={v}" for k, v in c["mesh"].items())),
                     ("remat / microbatches", f"{c['remat']} / {c['microbatches']}"),
                     ("GiB per chip", ", ".join(f"{k} {v:.2f}" for k, v in mem.items()))]
        rows.append(("why", lay["why"]))
        out += _rows("memory and layout", rows)
    cfg = p["config"]
    out += _rows("config", [("train", (f"steps {cfg['train']['steps']}, batch {cfg['train']['batch_size']} x "
                                      f"{cfg['train']['seq_len']}")),
                            ("optimizer", (f"{cfg['optimizer']['name']} lr {cfg['optimizer']['lr']} "
                                          f"{cfg['optimizer']['schedule']}, warmup "
                                          f"{cfg['optimizer']['warmup_steps']}"))])
    return "\n".join(out).rstrip() + "\n"


def fit_table(r: dict) -> str:
    out = [f"runs: {r['runs']}"]
    if r.get("parametric"):
        pf = r["parametric"]
        out.append("parametric fit L(N,D) = E + A/N^alpha + B/D^beta  (Huber delta=1e-3 on log loss, L-BFGS)")
        for k in ("E", "A", "B", "alpha", "beta", "a", "b"):
            ci = pf["ci"].get(k)
            ci_s = f"  95% CI [{ci[0]:.4g}, {ci[1]:.4g}]" if ci else ""
            out.append(f"  {k:<6} {pf[k]:.4g}{ci_s}")
    if r.get("isoflop"):
        iso = r["isoflop"]
        out.append("IsoFLOP parabolas (approach 2):")
        for g in iso["budgets"]:
            out.append(f"  C={g['flops']:.3g}: N_opt={num(g['params'])} D_opt={num(g['tokens'])} "
                       f"({g['runs']} runs)")
        if iso.get("a") is not None:
            out.append(f"  N_opt ∝ C^{iso['a']:.3f}, D_opt ∝ C^{iso['b']:.3f}")
    if r.get("allocation"):
        al = r["allocation"]
        out.append(f"optimal at C={al['flops']:.3g}: N={num(al['params'])} D={num(al['tokens'])}"
                   + (f"  (N 95% CI [{num(al['params_ci'][0])}, {num(al['params_ci'][1])}])"
                      if al.get("params_ci") else ""))
    if r.get("plot"):
        out.append(f"plot: {r['plot']}")
    return "\n".join(out) + "\n"
