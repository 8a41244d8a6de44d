"""`ckptprobe masks BASE --kind ... -o FILE` (one-shot training masks) and `ckptprobe masks info FILE`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, List, Optional

import typer
from typer.core import TyperGroup

from ckptprobe.cli._options import (DEFAULT_ALPHA, AlphaOpt, AtolOpt, BaseArg, By, DeviceOpt, DownloadOpt, EtaOpt,
                                    ExcludeOpt, FormatOpt, IncludeOpt, Kind, LowOpt, LowThreshold, ModeOpt, OutputOpt,
                                    RankOpt, RevisionOpt, ThreadsOpt, TokenOpt, TopkMethod, TopkMethodOpt, Vectors,
                                    file_name)


class _DefaultBuild(TyperGroup):
    """`masks BASE ...` means `masks build BASE ...`; `masks info FILE` is the other subcommand.

    Also lets `--from` take several values (`--from RUN1 RUN2`), which click options cannot.
    """

    def parse_args(self, ctx, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("-h", "--help"):
            args = ["build", *args]
        expanded, taking = [], False
        for a in args:
            if a == "--from":
                taking = True
                continue
            if taking and not a.startswith("-"):
                expanded += ["--from", a]
                continue
            taking = False
            expanded.append(a)
        if args and args[-1] == "--from":
            expanded.append("--from")  # let click report the missing value
        return super().parse_args(ctx, expanded)


masks_app = typer.Typer(
    cls=_DefaultBuild, no_args_is_help=True, rich_markup_mode="markdown",
    context_settings={"help_option_names": ["-h", "--help"]},
    help="Training masks from a base model: build one (`ckptprobe masks BASE --kind safe -o masks.safetensors`, "
         "short for `masks build ...`) or inspect one (`ckptprobe masks info FILE [--base BASE]`). Load a mask "
         "file in training with `ckptprobe.load_masks(path, device)`.")


@masks_app.command("build", no_args_is_help=True)
def build(
    base: BaseArg,
    output: Annotated[Path, typer.Option("--output", "-o", show_default=False, metavar="FILE", parser=file_name,
                                         help="The mask file to write (safetensors, written atomically).")],
    kind: Annotated[Optional[Kind], typer.Option(
        "--kind", show_default=False,
        help="principal: Top_alpha(|W0^(k)|). non-principal: its complement. low: low-magnitude entries. "
             "safe: low | non-principal. random: the density of --like per matrix, random positions. "
             "update: what --from FT changed. consensus: what at least --min-agree of the --from runs "
             "changed.")] = None,
    expr: Annotated[Optional[str], typer.Option(
        "--expr", show_default=False, metavar="EXPR",
        help="Set algebra over kind names instead of --kind: ~ not, & and, ^ xor, | or, parentheses "
             "(precedence as in Python), e.g. 'low & ~principal'.")] = None,
    vectors: Annotated[Optional[Vectors], typer.Option(
        "--vectors", show_default="none: required when some tensor gets no computed mask",
        help="Tensors that get no computed mask (1-D norms and biases, tensors left out by --include/--exclude, "
             "non-float tensors) are recorded as all trainable (train) or all frozen (freeze).")] = None,
    rank: RankOpt = None,
    alpha: AlphaOpt = DEFAULT_ALPHA,
    low_threshold: LowOpt = LowThreshold.alpha,
    like: Annotated[Optional[str], typer.Option(
        "--like", show_default=False, metavar="KIND",
        help="random: the kind (or expression) whose per-matrix density it copies.")] = None,
    seed: Annotated[int, typer.Option(
        "--seed", min=0, metavar="N", help="random: seed of the positions (mixed with each tensor's name).")] = 0,
    runs: Annotated[Optional[List[str]], typer.Option(
        "--from", show_default=False, metavar="RUN...",
        help="Fine-tuned checkpoints for update (one) and consensus (two or more): --from RUN1 RUN2 ...")] = None,
    min_agree: Annotated[Optional[int], typer.Option(
        "--min-agree", min=1, metavar="N", show_default="all of the --from runs",
        help="consensus: keep an entry that at least N of the --from runs changed (N = 2 of 3 runs: a "
             "majority).")] = None,
    mode: ModeOpt = None,
    eta: EtaOpt = None,
    atol: AtolOpt = None,
    device: DeviceOpt = "auto",
    topk_method: TopkMethodOpt = TopkMethod.auto,
    include: IncludeOpt = None,
    exclude: ExcludeOpt = None,
    by: Annotated[By, typer.Option("--by", help="Rows of the table shown on stdout.")] = By.module,
    threads: ThreadsOpt = None,
    revision: RevisionOpt = None,
    token: TokenOpt = None,
    download: DownloadOpt = False,
) -> None:
    """Build a one-shot training mask from a base model (and, for update/consensus, fine-tuned runs).

    True marks an entry that may train. Masks are computed for every 2-D weight matrix, one matrix at a
    time; `--vectors` says what the rest get. The file stores one bit per entry plus the recipe, each
    mask's density and a fingerprint of the base tensor it was computed from, so it is refused on any
    other model.

    "The Path Not Taken" (Sec. 5.1): RLVR's updates avoid principal weights (largest entries of the
    rank-k reconstruction) and prefer low-magnitude ones, so `safe = low | ~principal` is where sparse RL
    can train; `random` with `--like safe` is its control.

    Examples:

    `ckptprobe masks ./base --kind safe --low-threshold mean --vectors train -o safe.safetensors`

    `ckptprobe masks ./base --kind random --like safe --seed 1 --vectors train -o control.safetensors`

    `ckptprobe masks ./base --kind consensus --from ./rl-1 ./rl-2 ./rl-3 --vectors freeze -o consensus.safetensors`

    `ckptprobe masks ./base --expr 'low & ~principal' --include '*.mlp.*' --vectors freeze -o m.safetensors`
    """
    from ckptprobe.analysis.mask_expr import parse_expression
    from ckptprobe.analysis.masks import MaskSpec, build_masks
    from ckptprobe.cli._common import configure_threads, open_sources, tolerances, writable
    from ckptprobe.errors import UsageError
    from ckptprobe.io.maskfile import write_packed
    from ckptprobe.report.output import err, progress_bar, show, table, warn

    if (kind is None) == (expr is None):
        raise UsageError("give exactly one of --kind and --expr")
    text = kind.value if kind else expr
    atoms = parse_expression(text).atoms() | (parse_expression(like).atoms() if like else set())
    if like is not None and "random" not in parse_expression(text).atoms():
        raise UsageError("--like is only read by the random kind")
    if min_agree is not None and "consensus" not in atoms:
        raise UsageError("--min-agree is only read by the consensus kind")
    if min_agree is not None and min_agree > len(runs or ()):
        raise UsageError(f"--min-agree {min_agree}: more than the {len(runs or ())} --from runs")
    eta, atol = tolerances(mode, eta, atol)
    writable("-o", output)
    dev = None
    if "principal" in atoms:
        from ckptprobe.analysis.svd import resolve_device

        dev = resolve_device(device)
    configure_threads(threads)
    src, *run_sources = open_sources([base, *(runs or ())], revision, token, download)
    agree = 1.0 if min_agree is None else min_agree / len(run_sources)  # the library takes a fraction of runs
    spec = MaskSpec(text, rank, alpha, low_threshold, like, seed, agree, mode, eta, atol, topk_method.value, dev)
    with progress_bar("building masks", sum(src.info(n).nbytes for n in src.keys())) as advance:
        result = build_masks(src, spec, run_sources, kind.value if kind else None, include or (), exclude or (),
                             vectors, progress=advance)
    write_packed(output, result.packed(), result.recipe, result.fingerprints)
    small = [s for s in result.skipped if s.category == "small"]
    if small:  # a "principal" mask that trains (or freezes) a whole matrix should not pass unnoticed
        warn(f"{len(small)} matri{'ces' if len(small) > 1 else 'x'} smaller than k: no computed mask, --vectors "
             f"{vectors.value} instead (e.g. {small[0].name}, {small[0].reason})")
    total = result.total
    density = f"{100 * total['density']:.1f}%" if total["numel"] else "no"
    err.print(f"{result.recipe['expression']}: {density} of entries trainable ({total['trainable']:,} of "
              f"{total['numel']:,}); wrote {output}", highlight=False, markup=False)
    cols = ["name", "shape", "numel", "trainable", "density"] if by == By.tensor else \
        [by.value, "tensors", "numel", "trainable", "density"]
    show(table(f"Mask {result.recipe['expression']} of {src.ref}, by {by.value}", result.rows(by.value), cols))


@masks_app.command("info", no_args_is_help=True)
def info(
    file: Annotated[Path, typer.Argument(help="A mask file written by `ckptprobe masks`.", show_default=False,
                                         metavar="FILE", dir_okay=False)],
    base: Annotated[Optional[str], typer.Option(
        "--base", show_default=False, metavar="BASE",
        help="Check the file against this checkpoint: every mask's shape and the fingerprint of the base "
             "tensor it was computed from.")] = None,
    fmt: FormatOpt = None,
    output: OutputOpt = None,
    revision: RevisionOpt = None,
    token: TokenOpt = None,
    download: DownloadOpt = False,
) -> None:
    """What a mask file holds: its recipe and the trainable fraction (density) per module type, per layer
    and in total, counted from the stored bits.

    With `--base`, the file is first checked against that checkpoint and refused (exit 1) when a mask's
    shape or its base tensor's fingerprint differs, or it names a tensor the checkpoint lacks. A copy of the
    base in another float dtype (an fp32 export of a bf16 base) matches if casting it back gives the same bits.

    Examples:

    `ckptprobe masks info safe.safetensors`

    `ckptprobe masks info safe.safetensors --base ./base --format json`
    """
    from ckptprobe.analysis.masks import TensorMask, fingerprint_as, group_densities
    from ckptprobe.analysis.weights import not_a_weight
    from ckptprobe.cli._common import check_output, emit, open_sources
    from ckptprobe.io.maskfile import check_against, read_masks
    from ckptprobe.io.names import parse_name
    from ckptprobe.report.output import table, warn

    out = check_output(fmt, output)
    mf = read_masks(file)
    if base:
        src, = open_sources([base], revision, token, download)
        shapes = {n: src.info(n).shape for n in src.keys()}
        names = [n for n in mf.keys() if n in shapes and tuple(shapes[n]) == mf.shape(n)]
        fps = {n: fingerprint_as(src.get_array(n), src.info(n).dtype,
                                 (mf.tensors[n].get("fingerprint") or ":").split(":")[0]) for n in names}
        check_against(mf, shapes, fps)
        missing = [n for n in shapes if n not in mf.tensors and not_a_weight(src, n) is None]  # buffers never have one
        if missing:
            warn(f"{len(missing)} tensor(s) of {src.ref} have no mask, e.g. {missing[0]}; "
                 "mask_updates(missing=...) decides what happens to them")
    tensors = []
    for n in mf.keys():
        p = parse_name(n)
        entry = mf.tensors[n]
        tensors.append(TensorMask(n, p.layer, p.module, mf.shape(n), bool(entry.get("computed", True)),
                                  mf.count(n), entry.get("rank")))
    groups = {k: group_densities(tensors, k) for k in ("module", "layer")}
    n_all, c_all = sum(t.numel for t in tensors), sum(t.count for t in tensors)
    total = {"numel": n_all, "trainable": c_all, "density": c_all / n_all if n_all else None}
    data = {"command": "masks info", "file": str(file), "recipe": mf.recipe, "checked_against": base,
            "tensors": [t.to_dict() for t in tensors], "groups": groups, "total": total}
    recipe = ", ".join(f"{k}={v}" for k, v in mf.recipe.items() if k != "format" and v is not None)
    caption = (f"total: {c_all:,} of {n_all:,} entries trainable, density {total['density']:.4f}"
               if n_all else "empty mask file") + (f"; matches {base}" if base else "")
    cols = ["tensors", "numel", "trainable", "density"]
    tables = [table(f"{file}: {recipe}", groups["module"], ["module", *cols]),
              table("By layer", groups["layer"], ["layer", *cols], caption)]
    emit(out, data, data["tensors"], tables)
