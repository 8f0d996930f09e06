"""A desktop chat window over the edge-readme Python API, in plain Tkinter.

The engine streams on a worker thread; the window polls a queue with `root.after`, because Tk
widgets may only be touched from the thread that runs the main loop. Stop calls `cancel()`.

    python examples/tk_chat.py --model smollm2-135m --memory-budget auto

`ChatSession` holds everything but the widgets, so it can be driven without a display.
"""

from __future__ import annotations

import argparse
import queue
import threading
from typing import Any

from edge_readme import EdgeReadmeError, Engine


class ChatSession:
    """Multi-turn chat state and the worker thread; events come out of `poll()`.

    Events: ("text", str) for each streamed piece, ("done", Result) at the end of a reply,
    ("error", str) when the engine refused the request."""

    def __init__(self, engine: Engine, system: str | None = None, **sampling: Any):
        self.engine, self.sampling = engine, sampling
        self.messages: list[dict[str, str]] = []
        if system:
            self.messages.append({"role": "system", "content": system})
        self.events: queue.Queue = queue.Queue()
        self._stream = None
        self._stop = threading.Event()  # a Stop pressed before the stream exists still counts
        self._worker: threading.Thread | None = None

    @property
    def busy(self) -> bool:
        return self._worker is not None and self._worker.is_alive()

    def send(self, text: str) -> None:
        if self.busy:
            raise RuntimeError("a reply is still streaming (busy); stop it or wait")
        self.messages.append({"role": "user", "content": text})
        self._stop.clear()
        self._worker = threading.Thread(target=self._reply, daemon=True)
        self._worker.start()

    def stop(self) -> None:
        self._stop.set()
        if self._stream is not None:
            self._stream.cancel()

    def poll(self) -> list[tuple[str, Any]]:
        out = []
        while True:
            try:
                out.append(self.events.get_nowait())
            except queue.Empty:
                return out

    def _reply(self) -> None:
        try:
            self._stream = self.engine.chat_stream(self.messages, **self.sampling)
            if self._stop.is_set():
                self._stream.cancel()
            for chunk in self._stream:
                if chunk.text:
                    self.events.put(("text", chunk.text))
            result = self._stream.result
        except EdgeReadmeError as e:
            self.messages.pop()  # the turn did not happen
            self.events.put(("error", str(e)))
            return
        self.messages.append({"role": "assistant", "content": result.text})
        self.events.put(("done", result))


class ChatWindow:
    POLL_MS = 30

    def __init__(self, root, session: ChatSession):
        import tkinter as tk
        from tkinter import scrolledtext

        self.root, self.session = root, session
        root.title(f"edge-readme: {session.engine.name}")
        self.log = scrolledtext.ScrolledText(root, wrap="word", height=24, width=80,
                                             state="disabled")
        self.log.pack(fill="both", expand=True, padx=6, pady=6)
        bar = tk.Frame(root)
        bar.pack(fill="x", padx=6, pady=(0, 6))
        self.entry = tk.Entry(bar)
        self.entry.pack(side="left", fill="x", expand=True)
        self.entry.bind("<Return>", lambda _e: self.send())
        self.send_button = tk.Button(bar, text="Send", command=self.send)
        self.send_button.pack(side="left", padx=4)
        self.stop_button = tk.Button(bar, text="Stop", command=session.stop, state="disabled")
        self.stop_button.pack(side="left")
        self.status = tk.Label(root, anchor="w", text="ready")
        self.status.pack(fill="x", padx=6)
        root.after(self.POLL_MS, self.poll)

    def write(self, text: str) -> None:
        self.log.configure(state="normal")
        self.log.insert("end", text)
        self.log.see("end")
        self.log.configure(state="disabled")

    def send(self) -> None:
        text = self.entry.get().strip()
        if not text or self.session.busy:
            return
        self.entry.delete(0, "end")
        self.write(f"\nyou: {text}\nassistant: ")
        self.send_button.configure(state="disabled")
        self.stop_button.configure(state="normal")
        self.session.send(text)

    def poll(self) -> None:
        for kind, value in self.session.poll():
            if kind == "text":
                self.write(value)
            else:
                self.write("\n")
                self.send_button.configure(state="normal")
                self.stop_button.configure(state="disabled")
                self.status.configure(text=value if kind == "error" else _footer(value))
        self.root.after(self.POLL_MS, self.poll)


def _footer(result) -> str:
    s = result.stats
    rate = s.get("decode_tokens_per_s") or 0
    return f"{len(result.token_ids)} tokens, {rate:.1f} tok/s, {result.finish_reason}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-readme")
    ap.add_argument("--memory-budget", default=None)
    ap.add_argument("--system", default=None)
    ap.add_argument("--max-tokens", type=int, default=512)
    args = ap.parse_args()

    import tkinter as tk

    def progress(stage: str, frac: float) -> None:
        print(f"\r{stage}: {frac:4.0%}", end="", flush=True)

    with Engine.load(args.model, memory_budget=args.memory_budget, on_progress=progress) as engine:
        print()
        root = tk.Tk()
        session = ChatSession(engine, system=args.system, max_tokens=args.max_tokens,
                              temperature=0.7, top_p=0.95)
        ChatWindow(root, session)
        root.protocol("WM_DELETE_WINDOW", lambda: (session.stop(), root.destroy()))
        root.mainloop()


if __name__ == "__main__":
    main()
