"""`fedcollm run | deploy-local | experiment | eval | generate | export`: parse arguments, call the
launchers, print where the results are."""

from __future__ import annotations

import argparse
import json
import sys

from fedcollm.errors import FedCoLLMError


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="TOML config file")
    p.add_argument("--preset", help="default | cpu-pair | smoke")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config field, e.g. --set federation.rounds=5 (repeatable)")
    p.add_argument("--out", help="output directory (run.out_dir)")


def _config(args, *extra: str):
    from fedcollm.config import check_files, load_config  # noqa: PLC0415

    overrides = [*args.overrides, *extra]
    if args.out:
        overrides.append(f"run.out_dir={json.dumps(args.out)}")
    cfg = load_config(args.config, overrides, args.preset)
    check_files(cfg)
    return cfg


def _resume_config(args):
    """The config of the run in args.resume, with any --config/--set applied; a change to what
    the checkpoint was made with is refused unless --force."""
    import dataclasses  # noqa: PLC0415
    from pathlib import Path  # noqa: PLC0415

    from fedcollm import checkpoint  # noqa: PLC0415
    from fedcollm.config import load_config  # noqa: PLC0415

    out = Path(args.resume)
    state = checkpoint.load(out)
    if state is None:
        raise FedCoLLMError(f"--resume {out}: no {checkpoint.NAME} there (nothing to resume)")
    cfg = load_config(args.config or out / "config.toml", args.overrides, args.preset)
    if cfg.digest() != state["config_digest"] and not args.force:
        raise FedCoLLMError(f"--resume {out}: the config differs from the one its checkpoint was made with; "
                            "pass --force to resume with it anyway")
    from fedcollm.version import code_version  # noqa: PLC0415

    if state.get("code_version", code_version()) != code_version():  # e.g. a fix installed mid-run: allowed, said
        print(f"[fedcollm] warning: --resume {out}: its rounds 0-{state['round']} were computed by other code "
              f"(version {state['code_version']}, this is {code_version()})", file=sys.stderr, flush=True)
    return dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, out_dir=str(out), resume=True))


def cmd_run(args) -> int:
    cfg = _resume_config(args) if args.resume else _config(args)
    from fedcollm.runs.simulation import run_simulation  # noqa: PLC0415

    summary = run_simulation(cfg)
    comm = summary["comm"]
    print(json.dumps({k: summary[k] for k in ("rounds", "slm", "llm")}
                     | {k: comm[k] for k in ("up_ratio_to_fp32_slm", "down_ratio_to_fp32_slm")}))
    print(f"[fedcollm] report: {cfg.run.out_dir}/report.md")
    return 0


def cmd_deploy_local(args) -> int:
    cfg = _config(args, *([f"data.num_clients={args.clients}"] if args.clients is not None else []))
    from fedcollm.runs.deploy import deploy_local  # noqa: PLC0415

    summary = deploy_local(cfg, timeout=args.timeout)
    print(json.dumps({k: summary[k] for k in ("rounds", "slm", "llm", "deployment")}))
    print(f"[fedcollm] report: {cfg.run.out_dir}/report.md")
    return 0


def cmd_experiment(args) -> int:
    import shlex  # noqa: PLC0415
    from pathlib import Path  # noqa: PLC0415

    from fedcollm import components  # noqa: PLC0415
    from fedcollm.eval import scoring  # noqa: PLC0415
    from fedcollm.experiment.methods import METHODS, check_multiple_choice  # noqa: PLC0415
    from fedcollm.experiment.runner import run_experiment  # noqa: PLC0415

    base = _config(args)
    seeds = _listed(args.seeds, "--seeds", int, "integers, e.g. 0,1,2")
    datasets = _listed(args.datasets, "--datasets") if args.datasets else [base.data.dataset]
    from fedcollm.config import load_config  # noqa: PLC0415

    by_accuracy = next((flag for flag, given in (("--aux-fractions", args.aux_fractions), ("--traffic-grid",
                        args.traffic_grid), ("--dev-grid", args.dev_grid)) if given), None)
    for d in datasets:  # each dataset's config, and its evaluation set's kind, checked before anything runs
        cfg = load_config(args.config, [*args.overrides, f"data.dataset={json.dumps(d)}"], args.preset)
        if not args.report_only:  # tabulating the cache needs no data
            kind = scoring.kind_of(*components.eval_records(cfg))
            if by_accuracy:
                check_multiple_choice(kind, cfg, by_accuracy)
    out = Path(args.out or "runs/experiment")
    command = shlex.join(["fedcollm", *sys.argv[1:]])
    if args.aux_fractions:
        from fedcollm.experiment.runner import run_aux_sizes  # noqa: PLC0415

        fractions = _listed(args.aux_fractions, "--aux-fractions", float, "numbers, e.g. 0.05,0.1,0.2,0.4")
        for f in fractions:  # each one validated (0 < f < 1) before anything runs
            if f == 0:  # the config's 0 means equal parts: the table would call a 20% part 0%
                raise FedCoLLMError("--aux-fractions: 0 is no share of the training split (data.aux_fraction = 0 "
                                    "means equal parts, 1/(clients + 1)); name that share, e.g. 0.2")
            load_config(args.config, [*args.overrides, f"data.aux_fraction={f}"], args.preset)
        if len(datasets) != 1:
            raise FedCoLLMError("--aux-fractions: name one dataset (--datasets)")
        run_aux_sizes(base, datasets[0], fractions, seeds, _listed(args.methods, "--methods") if args.methods else ["fedcollm"],
                      out, command, compute=not args.report_only, allow_mixed=args.allow_mixed_versions,
                      parallel=args.jobs)
        print(f"[fedcollm] {out}/aux_size.md, {out}/aux_size.png, {out}/aux_size.json")
        return 0
    if args.traffic_grid:
        from fedcollm.experiment.traffic import parse_grid, run_traffic  # noqa: PLC0415

        points = parse_grid(args.traffic_grid)
        for p in points:  # each point validated before anything runs
            p.apply(base)
        if args.methods and args.methods != "fedcollm":
            raise FedCoLLMError("--traffic-grid runs FedCoLLM only: leave out --methods")
        doc = run_traffic(base, datasets, seeds, points, out, command, compute=not args.report_only,
                          allow_mixed=args.allow_mixed_versions, parallel=args.jobs)
        print(f"[fedcollm] {out}/traffic.md, {out}/pareto.png, {out}/traffic.json; choice: {doc['choice']['label']}")
        return 0
    if args.dev_grid:
        return _dev_search(args, datasets, seeds, out, command)
    methods = _listed(args.methods, "--methods") if args.methods else list(METHODS)
    doc = run_experiment(base, datasets, seeds, methods, out, command,
                         compute=not args.report_only, allow_mixed=args.allow_mixed_versions, parallel=args.jobs)
    print(f"[fedcollm] {len(doc['results'])} dataset(s): {out}/table1.md, {out}/table2.md, {out}/results.json")
    return 0


def _dev_search(args, datasets: list[str], seeds: list[int], out, command: str) -> int:
    from fedcollm.config import load_config  # noqa: PLC0415
    from fedcollm.experiment import dev_search  # noqa: PLC0415

    if any(o.replace(" ", "").startswith("data.eval_split=") for o in args.overrides):
        raise FedCoLLMError("--dev-grid scores each dataset on its own dev split: leave out --set data.eval_split")
    cells = dev_search.parse_dev_grid(args.dev_grid)

    def config_of(cell, dataset: str, seed: int):
        return load_config(args.config, [*args.overrides, *cell.overrides, f"data.dataset={json.dumps(dataset)}",
                                         f"data.eval_split={json.dumps(dev_search.dev_split(dataset))}",
                                         f"run.seed={seed}"], args.preset)

    for cell in cells:  # every cell validated on every dataset before anything runs
        for d in datasets:
            config_of(cell, d, seeds[0])
    methods = _listed(args.methods, "--methods") if args.methods else list(dev_search.METHODS)
    doc = dev_search.run_dev_search(config_of, cells, datasets, seeds, methods, out, command,
                                    compute=not args.report_only, allow_mixed=args.allow_mixed_versions,
                                    parallel=args.jobs)
    print(f"[fedcollm] {out}/dev.md, {out}/dev.png, {out}/dev.json; choice: {doc['choice']['label']}")
    return 0


def _base_of_run(args) -> None:
    """--model, and --prune with it, default to the base the --adapter was trained on where the
    adapter is a run's (its config.toml names them): `--adapter RUN/adapters/slm` alone is enough."""
    from fedcollm.models.lora import run_base  # noqa: PLC0415

    base = run_base(args.adapter) if args.adapter else None
    if not args.model:
        if base is None:
            raise FedCoLLMError(f"fedcollm {args.command}: give --model (it can be left out only with an --adapter "
                                "from a run's folder, whose config.toml names the base)")
        args.model = base[0]
    if base is not None and args.prune is None and args.model == base[0] and base[1]:
        args.prune = f"{base[1][0]},{base[1][1]}"


def _prune(args) -> tuple[int, int] | None:
    if not args.prune:
        return None
    try:
        first, last = (int(x) for x in args.prune.split(","))
    except ValueError:
        raise FedCoLLMError(f"--prune {args.prune!r}: expected FIRST,LAST, e.g. 10,10") from None
    return first, last


def _model(args, device, dtype):
    """--model, pruned by --prune, on `device`, with --adapter loaded (a PeftModel) if given."""
    from fedcollm.models.loading import load_base_model, prune_layers  # noqa: PLC0415

    prune = _prune(args)  # a bad value is said before a model loads
    model = load_base_model(args.model, dtype)
    if prune:
        model = prune_layers(model, *prune)
    model = model.to(device)  # after pruning: the dropped layers never reach the device
    if args.adapter:
        from fedcollm.models.lora import load_saved_adapter  # noqa: PLC0415

        model = load_saved_adapter(model, args.adapter, prune)
    return model


def cmd_eval(args) -> int:
    import torch  # noqa: PLC0415

    from fedcollm.data import chat  # noqa: PLC0415
    from fedcollm.data.loaders import load_split, read_records  # noqa: PLC0415
    from fedcollm.eval import scoring  # noqa: PLC0415
    from fedcollm.eval.mcq import auto_batch_size  # noqa: PLC0415
    from fedcollm.models.loading import load_tokenizer, resolve_device, resolve_dtype  # noqa: PLC0415
    from fedcollm.train.memory import out_of_memory_advice, scoring_advice  # noqa: PLC0415

    _base_of_run(args)
    device = resolve_device(args.device, "--device")
    # The items first: a file that cannot be scored (a mix of kinds) is said before a model loads.
    if args.file:
        records = read_records(args.file)
    else:
        records = load_split(args.data, args.split, args.data_path or "")
    where = args.file or f"{args.data} {args.split}"
    tok = load_tokenizer(args.model)
    records = chat.render(records, lambda: tok, args.model)
    kind = scoring.kind_of(records, where)
    if args.limit:
        records = records[: args.limit]
    model = _model(args, device, resolve_dtype("auto", device))
    with torch.inference_mode(), out_of_memory_advice(
            f"scoring on {device}", scoring_advice(auto_batch_size(args.batch_size, device), "--batch-size")):
        res = scoring.score(model, tok, records, scoring.prepare(tok, records, kind, args.max_length),
                            batch_size=args.batch_size, device=device, progress=True)
    print(json.dumps({"model": args.model, "adapter": args.adapter, "data": args.file or args.data,
                      "split": None if args.file else args.split,  # a file is scored whole
                      **{k: res[k] for k in (*scoring.metrics_of(res), "n")}}))
    return 0


def _prompts(args, tok) -> list[dict]:
    """What `fedcollm generate` writes after: each --prompt (a user message through the chat
    template with --chat), or each record of --file (an MCQ item's lm-eval prompt, a
    prompt-completion record's prompt, a conversation rendered up to its last answer), with the
    answer the file gives as `reference`."""
    from fedcollm.data import chat  # noqa: PLC0415
    from fedcollm.data.loaders import read_records  # noqa: PLC0415
    from fedcollm.data.records import training_pairs  # noqa: PLC0415

    if bool(args.prompt) == bool(args.file):
        raise FedCoLLMError("fedcollm generate: give --prompt (once or more) or --file, not both")
    if args.file:
        records = chat.render(read_records(args.file), lambda: tok, args.model)
        return [dict(zip(("id", "prompt", "reference"), (r.id, *training_pairs(r)[-1]))) for r in records]
    if args.chat and not getattr(tok, "chat_template", None):
        raise FedCoLLMError(f"fedcollm generate --chat: the tokenizer of {args.model} has no chat template")
    return [{"id": f"prompt{i}", "prompt": tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                                   add_generation_prompt=True) if args.chat else p}
            for i, p in enumerate(args.prompt)]


def cmd_generate(args) -> int:
    from fedcollm.models.generate import Decoding, generate  # noqa: PLC0415
    from fedcollm.models.loading import load_tokenizer, resolve_device, resolve_dtype  # noqa: PLC0415

    decoding = Decoding(args.temperature, args.top_k, args.top_p, args.seed)  # bad values said before any load
    _base_of_run(args)
    device = resolve_device(args.device, "--device")
    tok = load_tokenizer(args.model)
    items = _prompts(args, tok)  # a bad file is said before a model loads
    model = _model(args, device, resolve_dtype("auto", device))
    texts = generate(model, tok, [it["prompt"] for it in items], max_new_tokens=args.max_new_tokens,
                     batch_size=args.batch_size, device=device, decoding=decoding, progress=True)
    for it, text in zip(items, texts):
        print(json.dumps({**it, "generation": text}, ensure_ascii=False))
    return 0


def cmd_export(args) -> int:
    from pathlib import Path  # noqa: PLC0415

    import torch  # noqa: PLC0415

    from fedcollm.models.export import check_destination, export_merged  # noqa: PLC0415
    from fedcollm.models.loading import load_tokenizer  # noqa: PLC0415
    from fedcollm.version import code_version  # noqa: PLC0415

    _base_of_run(args)
    out = check_destination(Path(args.out))  # said before a model loads
    model = _model(args, torch.device("cpu"), torch.float32)  # merged in fp32, then cast
    record = export_merged(model, load_tokenizer(args.model), out, getattr(torch, args.dtype),
                           {"model": args.model, "adapter": str(Path(args.adapter).resolve()), "prune": _prune(args),
                            "fedcollm_code_version": code_version()})
    print(json.dumps({"out": str(out), **record}))
    return 0


def _add_model_args(p: argparse.ArgumentParser, adapter_required: bool = False) -> None:
    p.add_argument("--model", help="smollm2-135m | tiny-random | HF id | folder | .gguf (default: the base that "
                   "--adapter's run names)")
    p.add_argument("--adapter", required=adapter_required,
                   help="a saved LoRA adapter folder (a run's OUT/adapters/slm or OUT/adapters/llm)")
    p.add_argument("--prune", help="FIRST,LAST: keep these many first/last layers (the SLM base, e.g. 10,10; "
                   "default: as --adapter's run, where --model is its base)")


def _listed(text: str, flag: str, parse=str, what: str = "names"):
    """A comma-separated option's values, each parsed, none empty or twice (a seed listed twice
    would count as two seeds in the table's means)."""
    items = [t.strip() for t in text.split(",")]
    try:
        values = [parse(t) for t in items if t]
    except ValueError:
        raise FedCoLLMError(f"{flag} {text!r}: expected comma-separated {what}") from None
    if len(values) != len(items):
        raise FedCoLLMError(f"{flag} {text!r}: an empty item")
    twice = sorted({str(v) for v in values if values.count(v) > 1})
    if twice:
        raise FedCoLLMError(f"{flag} {text!r}: {', '.join(twice)} given twice")
    return values


def _at_least(low: int):
    """An argparse type: a whole number ≥ low (argparse turns the ValueError into a one-line error)."""
    def parse(text: str) -> int:
        value = int(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"{text!r}: must be a whole number ≥ {low}")
        return value
    parse.__name__ = "whole number"  # argparse's "invalid whole number value: 'x'"
    return parse


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fedcollm", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p_run = sub.add_parser("run", help="run FedCoLLM in Flower's simulation engine")
    _add_config_args(p_run)
    p_run.add_argument("--resume", metavar="DIR", help="continue the run in DIR after its last complete round")
    p_run.add_argument("--force", action="store_true", help="with --resume: accept a changed config")
    p_run.set_defaults(func=cmd_run)

    p_dep = sub.add_parser("deploy-local", help="run on a local SuperLink + N SuperNodes (TLS, node auth)")
    _add_config_args(p_dep)
    p_dep.add_argument("--clients", type=_at_least(1),
                       help="number of clients, one SuperNode each (sets data.num_clients)")
    p_dep.add_argument("--timeout", type=_at_least(1), default=6 * 3600, help="seconds to wait for the run")
    p_dep.set_defaults(func=cmd_deploy_local)

    p_exp = sub.add_parser("experiment", help="the paper's methods, baselines and ablations → Table 1 and 2")
    _add_config_args(p_exp)
    p_exp.add_argument("--seeds", default="0,1,2", help="comma-separated run seeds (default 0,1,2)")
    p_exp.add_argument("--datasets", help="comma-separated, e.g. arc_easy,openbookqa (default: data.dataset)")
    p_exp.add_argument("--methods", help="comma-separated subset of the methods (default: all)")
    p_exp.add_argument("--report-only", action="store_true",
                       help="write the tables from the cached results only; compute nothing")
    p_exp.add_argument("--jobs", type=_at_least(1), default=1, metavar="N",
                       help="run N (method, seed) jobs at once, each in its own process, spread over the "
                            "host's GPUs (a large GPU: many small jobs side by side; mind its memory)")
    p_exp.add_argument("--aux-fractions", metavar="F,F,...",
                       help="the auxiliary part's share of the training split, e.g. 0.05,0.1,0.2,0.4: "
                            "writes aux_size.md/.png (default method: fedcollm)")
    p_exp.add_argument("--traffic-grid", metavar="GRID",
                       help="accuracy against traffic: FedCoLLM over e.g. 'modules=qv,qkvo,all;r=4,8,16;"
                            "transport=fp32,fp16,int8,int4;a=train,frozen;secagg=off,on' ('A | B': the union of "
                            "two such grids); writes traffic.md, pareto.png and the cheapest plain setting within "
                            "1 point of the best")
    p_exp.add_argument("--dev-grid", metavar="GRID",
                       help="choose hyperparameters on each dataset's dev split: every cell of e.g. "
                            "'client.lr+distill.lr=3e-4,1e-3;client.local_epochs=1,2' (default methods: fedcollm, "
                            "standalone, centralized); writes dev.md, dev.json, dev.png and the best cell")
    p_exp.add_argument("--allow-mixed-versions", action="store_true",
                       help="use cached results of other code versions as they are (the table says so)")
    p_exp.set_defaults(func=cmd_experiment)

    p_eval = sub.add_parser("eval", help="score one model (+ adapter): accuracy on a multiple-choice split, "
                            "or the loss of a file of prompt-completion records")
    _add_model_args(p_eval)
    p_eval.add_argument("--data", default="arc_easy", help="arc_easy | arc_challenge | openbookqa | commonsense_qa")
    p_eval.add_argument("--file", help="a JSONL (or .parquet) file instead of --data: MCQ or prompt-completion records")
    p_eval.add_argument("--data-path", help="data root to search first")
    p_eval.add_argument("--split", default="test", choices=("train", "validation", "test"))
    p_eval.add_argument("--limit", type=_at_least(0), default=0, help="score the first N items (0: all)")
    p_eval.add_argument("--max-length", type=_at_least(1), default=256)
    p_eval.add_argument("--batch-size", type=_at_least(0), default=0,
                        help="choices per forward pass (0: 16 on CPU, 256 on GPU)")
    p_eval.add_argument("--device", default="auto")
    p_eval.set_defaults(func=cmd_eval)

    p_gen = sub.add_parser("generate", help="what one model (+ adapter) writes after prompts (greedy, or sampled "
                           "with --temperature), as JSON lines")
    _add_model_args(p_gen)
    p_gen.add_argument("--prompt", action="append", default=[], help="a prompt, as given (repeat for more)")
    p_gen.add_argument("--chat", action="store_true", help="with --prompt: each a user message through the chat "
                       "template (conversations in --file always are)")
    p_gen.add_argument("--file", help="a JSONL (or .parquet) file of MCQ, prompt-completion or conversational records: "
                       "each record's prompt, its answer as `reference`")
    p_gen.add_argument("--max-new-tokens", type=_at_least(1), default=64)
    p_gen.add_argument("--batch-size", type=_at_least(1), default=8, help="prompts per batch")
    p_gen.add_argument("--temperature", type=float, default=0.0, help="0: greedy (the same text every call); > 0: "
                       "sample at this temperature")
    p_gen.add_argument("--top-k", type=int, default=0, help="sample among the K most likely tokens (0: all)")
    p_gen.add_argument("--top-p", type=float, default=1.0, help="sample among the most likely tokens whose "
                       "probabilities reach P together (1: all)")
    p_gen.add_argument("--seed", type=int, default=0, help="the draws' seed: the same command and seed give the "
                       "same samples")
    p_gen.add_argument("--device", default="auto")
    p_gen.set_defaults(func=cmd_generate)

    p_exp_model = sub.add_parser("export", help="merge an adapter into its base and save a plain Hugging Face "
                                 "model folder (checked: same logits)")
    _add_model_args(p_exp_model, adapter_required=True)
    p_exp_model.add_argument("--out", required=True, help="a new folder for the merged model and its tokenizer")
    p_exp_model.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p_exp_model.set_defaults(func=cmd_export)

    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except FedCoLLMError as e:
        print(f"fedcollm: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
