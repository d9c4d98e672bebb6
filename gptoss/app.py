"""`gptoss app`: a local page where a question is answered by the base model and by the base with its
LoRA adapter, side by side (the fine-tuning recipe's demo Space, run on this machine).

One model is in memory. The adapter column runs it as loaded; the base column runs it inside
`gptoss.adapter.adapter_disabled` (every LoRA update scaled by 0), so its tokens are exactly those of
the model loaded without the adapter on the same products (a model prepacked for the CPU without an
adapter takes other products and may differ in the last bits), and the same seed drives both. One generation runs at a time:
`Engine` holds a lock around the model, and the page's queue (one job at a time) makes a second
request wait in line with its position shown.

The page (`build_page`) is a thin Gradio layer over `Engine`: `Engine.check` turns the page's fields
into a prompt or an `AppError` (shown on the page, never a traceback), and `Engine.stream` runs
`gptoss.generate.generate` in a worker thread and yields the reply as it grows, parsed with
`harmony.ReplyStream`. Setting the stop event (the Stop button, or a closed tab, which ends the
page's generator) ends the worker at its next token. Gradio is the optional `[app]` extra.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from gptoss.errors import UsageError, check_float, check_int
from gptoss.train.make_dataset import HELDOUT_ONLY, TRAIN_REASONING

LANGUAGES = (*TRAIN_REASONING, *HELDOUT_ONLY)  # the bundled set's seven reasoning languages

MAX_QUESTION_CHARS = 200_000  # beyond this a question is refused before it is tokenized (~50k tokens)
MAX_REPLY_TOKENS = 4096
UPDATES_PER_S = 20  # the page is redrawn at most this often while tokens arrive (and once at the end)
INSTALL_APP = "pip install 'gptoss[app]' (or `make demo`, which installs it)"


class AppError(ValueError):
    """A field of the page that cannot be used; the message says which and what to do."""


@dataclass
class Request:
    """What the page asks: the question and the settings of both columns."""

    question: str
    language: str = "English"  # the reasoning language: one of LANGUAGES or any name typed in
    effort: str = "medium"
    developer: str = ""  # further developer instructions, after "reasoning language: X"
    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = 0


@dataclass
class Column:
    """One column's reply so far."""

    analysis: str = ""
    final: str = ""
    tokens: list[int] = field(default_factory=list)
    seconds: float = 0.0
    state: str = "waiting"  # waiting, generating, done, stopped, token limit, not Harmony, error
    raw: str = ""  # the decoded tokens, shown when the reply left the Harmony format

    @property
    def shown(self) -> tuple[str, str]:
        """(analysis, final) as the page shows them: the raw text while nothing parsed as Harmony."""
        return (self.analysis, self.final) if self.analysis or self.final else ("", self.raw)

    @property
    def status(self) -> str:
        rate = f", {len(self.tokens) / self.seconds:.1f} tok/s" if self.seconds > 0 and self.tokens else ""
        return f"{self.state}: {len(self.tokens)} tokens{rate}"


class _StoppedError(Exception):
    pass


def _number(name: str, value, kind):
    """A page field as int or float: Gradio sends floats for every number box, None for an empty one."""
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise AppError(f"{name} must be a number, found {value!r}") from None
    if kind is int and isinstance(value, float) and value.is_integer():
        value = int(value)
    return value


class Engine:
    """The one model of the page, its adapter switched off for the base column, one generation at a time."""

    def __init__(self, model, has_adapter: bool):
        self.model = model
        self.has_adapter = has_adapter
        self.lock = threading.Lock()
        self.context = model.config.max_position_embeddings

    def check(self, r: Request) -> list[int]:
        """The Harmony prompt of `r`, or AppError saying which field is wrong and what to do."""
        from gptoss import harmony
        from gptoss.generate import check_sampling

        if not isinstance(r.question, str) or not r.question.strip():
            raise AppError("The question is empty: type a question, then press Ask.")
        if len(r.question) > MAX_QUESTION_CHARS:
            raise AppError(
                f"The question is {len(r.question):,} characters; at most {MAX_QUESTION_CHARS:,} are accepted: shorten it."
            )
        language = (r.language or "").strip()
        if not language or "\n" in language or len(language) > 40:
            raise AppError("The reasoning language must be a name on one line (at most 40 characters), e.g. French.")
        if r.effort not in harmony.REASONING_EFFORTS:
            raise AppError(
                f"Reasoning effort must be one of {', '.join(harmony.REASONING_EFFORTS)}, found {r.effort!r}."
            )
        try:
            # the fields as numbers, written back: generate receives exactly what was checked
            r.max_new_tokens = check_int(
                "Max new tokens", _number("Max new tokens", r.max_new_tokens, int), 1, MAX_REPLY_TOKENS
            )
            r.temperature = check_float("Temperature", _number("Temperature", r.temperature, float), 0.0)
            r.top_p, r.top_k = _number("Top-p", r.top_p, float), _number("Top-k", r.top_k, int)
            r.seed = None if r.seed is None else _number("Seed", r.seed, int)
            check_sampling(r.max_new_tokens, r.temperature, r.top_p, r.top_k, r.seed)
        except UsageError as e:
            raise AppError(f"{e}.") from None
        developer = f"reasoning language: {language}" + (f"\n\n{r.developer.strip()}" if r.developer.strip() else "")
        conversation = harmony.build_conversation(
            [{"role": "user", "content": r.question}], developer=developer, reasoning_effort=r.effort
        )
        prompt = harmony.render_prompt(conversation)
        if len(prompt) + r.max_new_tokens > self.context:
            raise AppError(
                f"The prompt is {len(prompt):,} tokens and a reply of up to {r.max_new_tokens:,} more would pass the model's "
                f"context of {self.context:,}: shorten the question or lower Max new tokens."
            )
        return prompt

    def stream(self, prompt: list[int], r: Request, adapter: bool, stop: threading.Event) -> Iterator[Column]:
        """Generate one reply (with the adapter on or off), yielding the column as it grows (at most
        UPDATES_PER_S times a second, and once when it ends). Blocks while another generation runs."""
        from gptoss import harmony
        from gptoss.adapter import adapter_disabled
        from gptoss.generate import generate

        tokens: queue.Queue = queue.Queue()
        end = object()

        def on_token(_row: int, token: int) -> None:
            if stop.is_set():
                raise _StoppedError
            tokens.put(token)

        def work() -> None:
            try:
                with self.lock, contextlib.nullcontext() if adapter else adapter_disabled(self.model):
                    generate(
                        self.model,
                        [prompt],
                        max_new_tokens=r.max_new_tokens,
                        temperature=r.temperature,
                        top_p=r.top_p,
                        top_k=r.top_k,
                        seed=r.seed,
                        on_token=on_token,
                        read_every=1,
                    )
            except _StoppedError:
                pass
            except Exception as e:  # shown in the column; the page goes on
                tokens.put(e)
            finally:
                tokens.put(end)

        column, parser = Column(state="generating"), harmony.ReplyStream()
        worker = threading.Thread(target=work, name="gptoss-app-generate", daemon=True)
        start, shown, ended = time.perf_counter(), 0.0, False
        worker.start()
        try:
            while (item := tokens.get()) is not end:
                if isinstance(item, Exception):
                    column.state = f"error: {' '.join(str(item).split())}"
                    continue
                if not column.tokens:
                    start = time.perf_counter()  # tok/s over the decode: the prompt's prefill is apart
                column.tokens.append(item)
                channel, delta = parser.push(item)
                if channel == "analysis":
                    column.analysis += delta
                elif delta:
                    column.final += delta
                column.seconds = time.perf_counter() - start
                if time.perf_counter() - shown >= 1 / UPDATES_PER_S:
                    shown = time.perf_counter()
                    if not (column.analysis or column.final):
                        column.raw = harmony.decode(column.tokens)
                    yield column
            ended = True
        finally:
            if not ended:  # the page stopped reading (Stop, a closed tab): the worker ends at its next token
                stop.set()
                worker.join()
        reply = parser.finish()
        column.raw = reply.raw
        parsed = reply.error is None and bool(reply.analysis or reply.final)
        # a reply outside the Harmony grammar (random weights give one): its text as it is (Column.shown)
        column.analysis, column.final = (reply.analysis, reply.final) if parsed else ("", "")
        if not column.state.startswith("error"):
            column.state = (
                "stopped"
                if stop.is_set()
                else "not Harmony (raw text shown)"
                if not parsed
                else "done"
                if reply.complete
                else "token limit"
            )
        yield column

    def ask(self, r: Request, stop: threading.Event) -> Iterator[tuple[list[int], Column, Column | None]]:
        """Both columns for one request: the base first (adapter off), then the adapter, with the same
        seed. Yields (prompt, base, tuned) as they grow; tuned is None without an adapter."""
        prompt = self.check(r)
        base, tuned = Column(), Column() if self.has_adapter else None
        with contextlib.closing(self.stream(prompt, r, adapter=False, stop=stop)) as columns:
            for base in columns:
                yield prompt, base, tuned
        if tuned is None or stop.is_set():
            if tuned is not None:
                tuned.state = "stopped"
                yield prompt, base, tuned
            return
        with contextlib.closing(self.stream(prompt, r, adapter=True, stop=stop)) as columns:
            for tuned in columns:
                yield prompt, base, tuned


def token_lines(tokens: list[int]) -> str:
    """One line per token: its id and its text (special tokens by name)."""
    from gptoss import harmony

    return "\n".join(f"{t:>7}  {harmony.decode([t])!r}" for t in tokens)


def build_page(engine: Engine, title: str = "gptoss"):
    """The Gradio Blocks of the page (not launched)."""
    import gradio as gr

    from gptoss import harmony

    two = engine.has_adapter
    with gr.Blocks(title=title, analytics_enabled=False) as page:
        gr.Markdown(
            f"## {title}\nAsk in any language, choose the language of the reasoning, and read "
            + ("the base model and the fine-tune side by side." if two else "the model's analysis and answer.")
        )
        with gr.Row():
            question = gr.Textbox(
                label="Question", lines=2, scale=4, elem_id="question", placeholder="e.g. Combien font 23 plus 19 ?"
            )
            with gr.Column(scale=1):
                language = gr.Dropdown(
                    list(LANGUAGES),
                    value="French",
                    allow_custom_value=True,
                    elem_id="language",
                    label="Reasoning language (or type one)",
                )
                effort = gr.Radio(list(harmony.REASONING_EFFORTS), value="medium", label="Reasoning effort")
        with gr.Accordion("Sampling", open=False):
            with gr.Row():
                max_new = gr.Slider(
                    1,
                    min(MAX_REPLY_TOKENS, engine.context // 2),
                    value=256,
                    step=1,
                    label="Max new tokens",
                    elem_id="max-new",
                )
                temperature = gr.Slider(
                    0.0, 2.0, value=1.0, step=0.05, label="Temperature (0 = greedy)", elem_id="temperature"
                )
                top_p = gr.Slider(0.05, 1.0, value=1.0, step=0.05, label="Top-p")
                top_k = gr.Number(value=0, precision=0, label="Top-k (0 = all)", minimum=0)
                seed = gr.Number(value=0, precision=0, label="Seed (both columns)", minimum=0)
            developer = gr.Textbox(
                "You are a helpful assistant.", lines=1, label="Developer instructions (after 'reasoning language: X')"
            )
        with gr.Row():
            ask = gr.Button("Ask", variant="primary", elem_id="ask")
            stop = gr.Button("Stop", elem_id="stop")
        with gr.Tab("Answers"):
            with gr.Row():
                boxes = []
                for name, key in [("Base", "base"), ("Base + adapter", "tuned")] if two else [("Model", "base")]:
                    with gr.Column():
                        gr.Markdown(f"### {name}")
                        boxes += [
                            gr.Textbox(label="analysis", lines=8, interactive=False, elem_id=f"{key}-analysis"),
                            gr.Textbox(label="final", lines=3, interactive=False, elem_id=f"{key}-final"),
                            gr.Markdown("", elem_id=f"{key}-status"),
                        ]
        with gr.Tab("Harmony"):
            rendered = gr.Textbox(label="the rendered prompt", lines=8, interactive=False, elem_id="rendered")
            prompt_ids = gr.Textbox(label="the prompt's token ids", lines=2, interactive=False)
            raw = [
                gr.Textbox(label=f"{name}: the reply's tokens (id, text)", lines=8, interactive=False)
                for name in (["base", "base + adapter"] if two else ["model"])
            ]

        # The Ask button: disabled by the answer's first update, enabled by its last (Stop ends the worker,
        # so the answer reaches its last update at once); a bad field raises before the first update and
        # leaves it as it was. A second click while one runs is refused (the button is off, and a click
        # event runs once at a time); another page's question waits in the queue, its position shown on its
        # outputs.
        busy, idle = gr.update(interactive=False), gr.update(interactive=True)

        halts: dict[str, threading.Event] = {}  # the running question's stop event, by page session

        def answer(q, lang, eff, dev, n, temp, p, k, s, request: gr.Request):
            r = Request(q, lang, eff, dev or "", n, temp, p, k, s)
            halt = halts[request.session_hash] = threading.Event()
            try:
                first = engine.check(r)
            except AppError as e:
                raise gr.Error(str(e), print_exception=False) from None
            button, harmony_tab = busy, (harmony.decode(first), ", ".join(map(str, first)))  # the prompt: once
            try:
                for _, base, tuned in engine.ask(r, halt):
                    cols = [base] + ([tuned or Column()] if two else [])
                    yield (
                        button,
                        *[v for c in cols for v in (*c.shown, c.status)],
                        *harmony_tab,
                        *[token_lines(c.tokens) for c in cols],
                    )
                    button = gr.update()
            finally:
                halt.set()  # a closed tab closes this generator: the worker ends at its next token
                if halts.get(request.session_hash) is halt:
                    del halts[request.session_hash]
            yield (idle, *[gr.update()] * (len(boxes) + 2 + len(raw)))

        def halt_session(request: gr.Request):
            """Stop: this page's running question ends at its next token; its columns say "stopped" and
            its last update enables Ask again (a question still waiting in the queue runs when its turn comes)."""
            event = halts.get(request.session_hash)
            if event is not None:
                event.set()

        # gradio passes the request to a parameter annotated gr.Request; this module's annotations are
        # strings (PEP 563) naming a local import it cannot resolve, so the class is set here
        answer.__annotations__["request"] = halt_session.__annotations__["request"] = gr.Request
        outputs = [ask, *boxes, rendered, prompt_ids, *raw]
        inputs = [question, language, effort, developer, max_new, temperature, top_p, top_k, seed]
        for trigger in (ask.click, question.submit):
            trigger(answer, inputs, outputs, concurrency_limit=1, concurrency_id="model")
        stop.click(halt_session, None, None, queue=False)
    return page


def free_port(host: str, port: int) -> None:
    """UsageError unless `port` can be bound on `host` (checked before the model loads)."""
    import socket

    try:
        family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except (socket.gaierror, UnicodeError) as e:
        why = getattr(e, "strerror", None) or str(e)
        raise UsageError(
            f"--host {host!r} is not an address ({why}): give an address of this machine, e.g. 127.0.0.1"
        ) from None
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server will: a closed page's port is free
        try:
            s.bind(address)
        except OSError as e:
            taken = e.errno == errno.EADDRINUSE
            raise UsageError(
                f"--port {port} is in use on {host}: stop what holds it or choose another --port"
                if taken
                else f"--host {host} --port {port}: cannot listen there ({e.strerror}); give an address of this machine"
            ) from None


def run(args: argparse.Namespace, load) -> int:
    """`gptoss app`: check the flags, load the model once, serve the page until Ctrl-C."""
    check_int("--port", args.port, 1, 65535)
    free_port(args.host, args.port)
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise UsageError(f"gptoss app needs Gradio, which is not installed: {INSTALL_APP}") from None
    model = load(args)
    engine = Engine(model, has_adapter=args.adapter is not None)
    page = build_page(engine)
    page.queue(default_concurrency_limit=1)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"gptoss app: listening on {args.host}: anyone who can reach this machine can use the page")
    print(
        f"gptoss app: open http://{'localhost' if args.host in ('127.0.0.1', '::1') else args.host}:{args.port} "
        "(Ctrl-C stops)",
        flush=True,
    )
    page.launch(
        server_name=args.host,
        server_port=args.port,
        share=False,
        inbrowser=False,
        quiet=True,
        footer_links=[],
        show_error=False,
    )
    return 0
