"""Model output as HTML an annotator can read and that cannot run anything.

Responses are untrusted: a model (or whoever wrote the imported file) can put `<script>`
or `<img onerror=...>` in them. They are rendered here, on the server, by markdown-it
with raw HTML turned off, so any tag in the text comes out escaped and is shown as the
literal text the model wrote; markdown-it also refuses `javascript:`, `vbscript:`,
`file:` and most `data:` links. Images are off so an annotation page never fetches a
URL a response chose. The browser receives finished, inert HTML (the page's gr.HTML
sets it as-is), and a headless-Chromium test checks that nothing in it executes.
"""

from __future__ import annotations

import html
from functools import lru_cache

from markdown_it import MarkdownIt

_md = (MarkdownIt("commonmark", {"html": False, "linkify": False, "typographer": False})
       .enable(["table", "strikethrough"])
       .disable("image"))


def _link_open(tokens, idx, options, env):
    # Links leave the page in a new tab and tell the target nothing about where they came from.
    tokens[idx].attrSet("target", "_blank")
    tokens[idx].attrSet("rel", "noopener noreferrer nofollow")
    return _md.renderer.renderToken(tokens, idx, options, env)


_md.add_render_rule("link_open", _link_open)


@lru_cache(maxsize=4096)
def markdown_html(text: str) -> str:
    # Cached: with K votes per pair each response is shown K times, and rendering is the
    # costliest step of answering a vote (~1 ms for a few paragraphs).
    return _md.render(text)


def prompt_html(prompt: str | list) -> str:
    """A prompt string, or a conversation shown turn by turn with each speaker named."""
    if isinstance(prompt, str):
        return markdown_html(prompt)
    return "".join(f'<div class="turn"><div class="role">{html.escape(str(m["role"]))}</div>'
                   f'{markdown_html(str(m["content"]))}</div>' for m in prompt)
