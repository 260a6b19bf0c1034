"""`align label ...`: import pairs, manage annotators, serve the app, export votes.

`add_parser(subparsers)` adds the `label` command to `align`'s parser and `run(args)`
carries it out; `python -m labeling_app ...` is `align label ...` on its own.
Input problems raise `AlignError` (one line, exit code 2).
"""

from __future__ import annotations

import argparse
import getpass
import random
import sys
from datetime import datetime, timezone
from pathlib import Path

from align.errors import AlignError

DB_HELP = "the label database, a SQLite file (default labels.sqlite)"

EPILOG = """workflow:
  align label users add alice --admin          create an admin (asks for a password)
  align label users add bob                    and an annotator
  align label import rollouts.jsonl            pairs from N completions per prompt
  align label serve --overlap 3                annotators vote at http://127.0.0.1:7860
  align label export --out prefs.jsonl         majority pairs for the reward and DPO stages
"""


def add_parser(subparsers) -> argparse.ArgumentParser:
    label = subparsers.add_parser(
        "label", help="the labeling app: collect human preference pairs",
        description="Collect human preference votes on pairs of responses with several annotators, "
                    "and export them for the reward, DPO and KTO stages.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    label.set_defaults(label_parser=label)
    sub = label.add_subparsers(dest="label_command", metavar="COMMAND")

    _add_import_parser(sub)
    _add_users_parser(sub)

    serve = sub.add_parser(
        "serve", help="start the labeling app (Gradio)",
        description="Serve the annotator page: log in, see a prompt and two responses side by side (sides "
                    "shuffled per presentation), vote A better / B better / tie / both bad / skip with an optional "
                    "reason, by button or key (1-5, u to undo). Admins also get totals, speed, agreement, "
                    "position bias and export.")
    serve.add_argument("--db", default="labels.sqlite", help=DB_HELP)
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; "
                       "0.0.0.0 for other machines, behind TLS)")
    serve.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    serve.add_argument("--guidelines", metavar="FILE", help="markdown file shown in the guidelines panel")
    serve.add_argument("--overlap", type=int, default=3, metavar="K",
                       help="independent votes each pair collects (default 3)")
    serve.add_argument("--allow-origin", action="append", default=[], metavar="URL",
                       help="another site whose pages may call the app with an annotator's cookie (CORS), e.g. "
                            "https://tools.example.com; repeatable. Default none: requests from other sites are "
                            "refused with 403")
    serve.add_argument("--order", default="random", choices=["random", "fifo", "uncertainty"],
                       help="which pair comes next once started pairs are filled first: random (default; a fixed "
                            "shuffle), fifo (oldest first), uncertainty (smallest reward gap first: import with "
                            "--reward-model)")
    serve.add_argument("--gold-rate", type=float, default=0.05, metavar="P",
                       help="the chance that the next pair is a gold pair the annotator has not judged (default "
                            "0.05; `import --gold`); shown like any other pair")
    serve.add_argument("--https", action="store_true",
                       help="mark the session cookie Secure (served over HTTPS behind a proxy that does not send "
                            "X-Forwarded-Proto; a request that arrives as https gets it anyway)")
    serve.add_argument("--session-idle-hours", type=float, default=12.0,
                       help="a session unused this long ends (default 12)")
    serve.add_argument("--session-days", type=float, default=7.0,
                       help="a session ends this long after login, used or not (default 7)")
    serve.add_argument("--lease-minutes", type=float, default=10.0,
                       help="a pair handed out and not voted on within this time goes back to the pool "
                            "(default 10)")

    exp = sub.add_parser(
        "export", help="write votes for training: majority pairs, raw votes or KTO rows",
        description="Write majority-aggregated pairs as {prompt, chosen, rejected}, the preference format the "
                    "reward and DPO stages read; --raw writes every vote, --kto unpaired {prompt, completion, "
                    "label} rows. Pairs judged a tie, split without a majority, or below the thresholds are left "
                    "out and counted.")
    exp.add_argument("--db", default="labels.sqlite", help=DB_HELP)
    exp.add_argument("--out", required=True, help="output JSONL file (written atomically)")
    exp.add_argument("--min-votes", type=int, default=1, metavar="K", help="keep pairs with at least K votes "
                     "(default 1; skips are not votes)")
    exp.add_argument("--min-agreement", type=float, default=0.0, metavar="X",
                     help="keep pairs whose majority has at least this share of the votes, 0-1 (default 0)")
    exp.add_argument("--min-gold-accuracy", type=float, default=0.0, metavar="X",
                     help="leave out the votes of annotators who answered less than this share of gold pairs as "
                          "known, 0-1 (default 0; annotators who met no gold pair are kept)")
    kind = exp.add_mutually_exclusive_group()
    kind.add_argument("--raw", action="store_true", help="every vote: annotator, sides shown, times, reason")
    kind.add_argument("--kto", action="store_true", help="thumbs-up/down rows for the KTO stage")
    _add_quality_parsers(sub)
    return label


def _add_import_parser(sub) -> None:
    """`align label import`."""
    imp = sub.add_parser(
        "import", help="add pairs to label from a rollouts, pairs or preference file",
        description="Add pairs to the database. Rollouts rows {prompt, completions, rewards, model} give one pair "
                    "per two different completions; pairs rows {prompt, response_a, response_b, metadata} are "
                    "taken as they are; preference rows {prompt, chosen, rejected} become pairs to re-judge. "
                    "Pairs already in the database (same prompt and responses, either order) are skipped and "
                    "counted. A bad row stops the import before anything is added.")
    imp.add_argument("file", help="JSONL, JSON, Parquet or CSV file, or a save_to_disk folder")
    imp.add_argument("--db", default="labels.sqlite", help=DB_HELP)
    imp.add_argument("--format", default="auto", choices=["auto", "rollouts", "pairs", "preference"],
                     help="row format (default: told from the first row)")
    imp.add_argument("--max-pairs-per-prompt", type=int, default=0, metavar="N",
                     help="rollouts: at most N pairs per prompt, a seeded sample (default 0: every pair)")
    imp.add_argument("--seed", type=int, default=0, help="seed for --max-pairs-per-prompt sampling (default 0)")
    imp.add_argument("--gold", action="store_true",
                     help="FILE holds gold pairs, preference rows {prompt, chosen, rejected} whose answer is known: "
                          "stored with the sides in a seeded random order and the answer in the metadata, never "
                          "exported for training, mixed into every annotator's queue at `serve --gold-rate`")
    imp.add_argument("--reward-model", metavar="PATH",
                     help="score both responses of every pair with this reward model (a reward stage's model/ "
                          "folder) and store reward_a, reward_b and reward_gap in the pair's metadata (never shown "
                          "to annotators), for `serve --order uncertainty`")


def _add_quality_parsers(sub) -> None:
    """`align label stats` and `align label leaderboard`."""
    stats = sub.add_parser(
        "stats", help="annotator quality: agreement with the majority, speed, length bias",
        description="Per annotator: votes, agreement with the others' majority (leave-one-out, on pairs with two "
                    "or more other verdicts), median seconds per vote (under 2 s is marked too fast), and how often "
                    "the longer answer won; the same for the whole team.")
    board = sub.add_parser(
        "leaderboard", help="rank models from the votes (Bradley-Terry, bootstrap interval)",
        description="For pairs whose metadata names model_a and model_b (rollouts of several checkpoints): a "
                    "Bradley-Terry fit of the verdicts, ties as half wins, as a score on the Elo scale (mean 1000) "
                    "with a percentile bootstrap 95%% interval over votes.")
    board.add_argument("--rounds", type=int, default=1000, help="bootstrap rounds (default 1000)")
    for parser in (stats, board):
        parser.add_argument("--db", default="labels.sqlite", help=DB_HELP)
        parser.add_argument("--json", action="store_true", help="JSON instead of a table")


def _add_users_parser(sub) -> None:
    """`align label users add | passwd | list | remove | unlock`."""
    users = sub.add_parser("users", help="add, list and remove annotator accounts",
                           description="Annotator accounts. Passwords are stored as salted scrypt hashes, "
                                       "never in clear. Logging in is required for every page of the app.")
    users_sub = users.add_subparsers(dest="users_command", metavar="ACTION")
    add = users_sub.add_parser("add", help="create an account", description="Create an account; asks for its "
                               "password twice, or reads one line from stdin with --password-stdin.")
    add.add_argument("name", help="login name: letters, digits and _.@- (up to 64); case and Unicode forms are "
                     "folded (Alice is alice)")
    add.add_argument("--admin", action="store_true", help="may see the admin view and export")
    add.add_argument("--password-stdin", action="store_true", help="read the password from the first line of stdin")
    add.add_argument("--db", default="labels.sqlite", help=DB_HELP)
    passwd = users_sub.add_parser("passwd", help="set a new password",
                                  description="Replace an account's password.")
    passwd.add_argument("name", help="login name")
    passwd.add_argument("--password-stdin", action="store_true",
                        help="read the password from the first line of stdin")
    passwd.add_argument("--db", default="labels.sqlite", help=DB_HELP)
    listing = users_sub.add_parser("list", help="list accounts with their vote counts",
                                   description="List accounts: name, role, votes cast, created.")
    listing.add_argument("--db", default="labels.sqlite", help=DB_HELP)
    remove = users_sub.add_parser("remove", help="delete an account (its votes stay)",
                                  description="Delete an account. It is locked out at once, even from a running "
                                              "server; the votes it cast stay in the database and in exports.")
    remove.add_argument("name", help="login name")
    remove.add_argument("--db", default="labels.sqlite", help=DB_HELP)
    unlock = users_sub.add_parser("unlock", help="clear an account's failed logins (lifts a lockout)",
                                  description="Forget an account's failed logins: 10 within 15 minutes lock it for "
                                              "15 minutes, and each one lengthens the wait before the next try. "
                                              "Takes effect at once, even on a running server.")
    unlock.add_argument("name", help="login name")
    unlock.add_argument("--db", default="labels.sqlite", help=DB_HELP)


def run(args, reward_scorer=None) -> int:
    """`reward_scorer`: `path -> f(prompts, completions) -> list[float]`, a reward model loader the caller (align's
    CLI) hands in, since this component does not import another (`import --reward-model`)."""
    args.reward_scorer = reward_scorer
    command = getattr(args, "label_command", None)
    if command is None:
        args.label_parser.print_help()
        return 2
    if command == "import":
        return cmd_import(args)
    if command == "users":
        return cmd_users(args)
    if command == "serve":
        return cmd_serve(args)
    if command == "export":
        return cmd_export(args)
    if command in ("stats", "leaderboard"):
        return cmd_quality(args)
    raise ValueError(command)


def cmd_quality(args) -> int:
    import json

    from labeling_app import quality
    from labeling_app.store import LabelStore

    with LabelStore(args.db) as store:
        if args.label_command == "stats":
            result = quality.annotator_stats(store)
            text = quality.stats_markdown(result)
        else:
            if args.rounds < 1:
                raise AlignError(f"--rounds must be at least 1, got {args.rounds}")
            result = quality.leaderboard(store, rounds=args.rounds)
            text = quality.leaderboard_markdown(result)
    print(json.dumps(result, indent=1) if args.json else text)
    return 0


def cmd_import(args) -> int:
    from labeling_app.importing import read_pairs
    from labeling_app.store import LabelStore

    if args.max_pairs_per_prompt < 0:
        raise AlignError(f"--max-pairs-per-prompt must be 0 (every pair) or more, got {args.max_pairs_per_prompt}")
    pairs = read_pairs(args.file, "preference" if args.gold else args.format, args.max_pairs_per_prompt, args.seed)
    if args.gold:
        pairs = gold_pairs(pairs, args.seed)
    if args.reward_model:
        score_pairs(pairs, args.reward_model, args.reward_scorer)
    with LabelStore(args.db, create=True) as store:
        added, duplicates = store.add_pairs(pairs)
        total = store.counts()["pairs"]
    print(f"imported {added} pairs from {args.file} into {args.db}; skipped {duplicates} duplicates; "
          f"{total} pairs in the database")
    return 0


def gold_pairs(pairs: list, seed: int) -> list:
    """Preference pairs (chosen as A) as gold pairs: A and B swapped for a seeded half, `gold` naming the chosen."""
    from labeling_app.store import NewPair

    rng, out = random.Random(seed), []
    for p in pairs:
        meta = {k: v for k, v in p.metadata.items() if k not in ("prior_choice", "source")}
        swap = rng.random() < 0.5
        a, b = (p.response_b, p.response_a) if swap else (p.response_a, p.response_b)
        out.append(NewPair(p.prompt, a, b, {**meta, "source": "gold", "gold": "b" if swap else "a"}))
    return out


def score_pairs(pairs: list, reward_model: str, reward_scorer) -> None:
    """Each pair's reward gap under `reward_model`, into its metadata: reward_a, reward_b, reward_gap (a - b)."""
    if not (Path(reward_model) / "config.json").exists():
        raise AlignError(f"--reward-model {reward_model}: expected a reward model folder (the model/ of a reward "
                         "stage)")
    if reward_scorer is None:
        raise AlignError("--reward-model needs align's reward models: run it as `align label import ...`")
    score = reward_scorer(reward_model)
    prompts = [p.prompt for p in pairs]
    rewards_a = score(prompts, [p.response_a for p in pairs])
    rewards_b = score(prompts, [p.response_b for p in pairs])
    for pair, a, b in zip(pairs, rewards_a, rewards_b):
        pair.metadata.update(reward_a=a, reward_b=b, reward_gap=a - b)


def cmd_users(args) -> int:
    from labeling_app.passwords import hash_password
    from labeling_app.store import LabelStore, canonical_name

    action = args.users_command
    if action is None:
        raise AlignError("label users: expected an action: add, list, remove, passwd or unlock")
    if action != "list":
        args.name = canonical_name(args.name)
    if action in ("add", "passwd"):
        _check_name(args.name)
        if action == "add":
            with LabelStore(args.db, create=True) as store:  # refuse a taken name before asking for a password
                if store.user(args.name):
                    raise AlignError(f"user '{args.name}' already exists in {args.db}")
        password = _read_password(args.password_stdin)
        with LabelStore(args.db, create=(action == "add")) as store:
            if action == "add":
                store.add_user(args.name, hash_password(password), args.admin)
                print(f"added {'admin' if args.admin else 'annotator'} '{args.name}' to {args.db}")
            else:
                store.set_password(args.name, hash_password(password))
                print(f"password changed for '{args.name}'")
        return 0
    with LabelStore(args.db) as store:
        if action == "remove":
            store.remove_user(args.name)
            print(f"removed '{args.name}' from {args.db}; their votes stay")
            return 0
        if action == "unlock":
            if store.user(args.name) is None:
                raise AlignError(f"no user '{args.name}' in {args.db}")
            print(f"unlocked '{args.name}': {store.clear_login_failures(args.name)} failed logins forgotten")
            return 0
        votes = {}
        for vote in store.votes():
            votes[vote.annotator] = votes.get(vote.annotator, 0) + 1
        accounts = store.users()
    if not accounts:
        print(f"no users in {args.db}; add one with `align label users add NAME --admin`")
        return 0
    width = max(len(u.name) for u in accounts)
    print(f"{'name':<{width}}  role       votes  created (UTC)")
    for u in accounts:
        created = datetime.fromtimestamp(u.created_at, timezone.utc).strftime("%Y-%m-%d %H:%M")
        print(f"{u.name:<{width}}  {'admin' if u.is_admin else 'annotator':<9}  {votes.get(u.name, 0):>5}  {created}")
    return 0


def cmd_serve(args) -> int:
    from labeling_app.store import LabelStore

    if args.overlap < 1:
        raise AlignError(f"--overlap must be at least 1, got {args.overlap}")
    if not 0 < args.port < 65536:
        raise AlignError(f"--port must be between 1 and 65535, got {args.port}")
    if args.lease_minutes <= 0:
        raise AlignError(f"--lease-minutes must be more than 0, got {args.lease_minutes}")
    if args.session_idle_hours <= 0 or args.session_days <= 0:
        raise AlignError("--session-idle-hours and --session-days must be more than 0")
    from labeling_app.siteguard import normalize_origin

    for origin in args.allow_origin:
        if not normalize_origin(origin) or normalize_origin(origin) != origin.rstrip("/").lower():
            raise AlignError(f"--allow-origin {origin}: expected an origin such as https://tools.example.com "
                             "(scheme, host and port only)")
    guidelines = None
    if args.guidelines:
        try:
            guidelines = Path(args.guidelines).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise AlignError(f"{args.guidelines}: cannot read guidelines ({e.__class__.__name__}: {e})") from None
    store = LabelStore(args.db, order=args.order, gold_rate=args.gold_rate)
    try:
        counts = store.counts()
        if counts["users"] == 0:
            raise AlignError(f"{args.db}: no users; add one with `align label users add NAME --admin`")
        from labeling_app.app import DEFAULT_GUIDELINES, serve  # Gradio takes seconds to import: only now

        print(f"labeling app on http://{args.host}:{args.port} ({counts['pairs']} pairs, {args.overlap} votes "
              f"per pair, {counts['users']} users); Ctrl+C stops it", flush=True)
        serve(store, args.host, args.port, args.overlap, args.lease_minutes * 60, guidelines or DEFAULT_GUIDELINES,
              tuple(args.allow_origin), args.https, args.session_idle_hours * 3600, args.session_days * 86400)
    finally:
        store.close()
    return 0


def cmd_export(args) -> int:
    from labeling_app import export
    from labeling_app.store import LabelStore

    with LabelStore(args.db) as store:
        if args.raw:
            summary, what = export.export_raw(store, args.out), "votes"
        elif args.kto:
            summary = export.export_kto(store, args.out, args.min_votes, args.min_agreement, args.min_gold_accuracy)
            what = "KTO rows"
        else:
            summary = export.export_preferences(store, args.out, args.min_votes, args.min_agreement,
                                                args.min_gold_accuracy)
            what = "preference pairs"
    print(summary.line(Path(args.out), what))
    return 0


def _check_name(name: str) -> None:
    from labeling_app.store import name_problem

    if why := name_problem(name):
        raise AlignError(f"user name {name!r}: {why}")


def _read_password(from_stdin: bool) -> str:
    from labeling_app.passwords import MIN_LENGTH

    if from_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    elif not sys.stdin.isatty():
        raise AlignError("no terminal to ask for a password on; pipe it in with --password-stdin")
    else:
        password = getpass.getpass("password: ")
        if getpass.getpass("again: ") != password:
            raise AlignError("the two passwords differ; nothing was changed")
    if len(password) < MIN_LENGTH:
        raise AlignError(f"password too short: expected at least {MIN_LENGTH} characters")
    return password
