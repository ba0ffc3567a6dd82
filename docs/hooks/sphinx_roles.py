"""mkdocs hook: render the Sphinx markup of the docstrings for this site.

The docstrings are written for both ``help()`` and this site; mkdocstrings renders them as
Markdown, where a role such as ``:func:`kappatune.scan``` would show its ``:func:`` prefix and a
``.. math::`` directive would stay literal text. This hook

- drops the prefix of the cross-reference roles and, as Sphinx does for a leading ``~``, shows only
  the last name;
- turns ``:math:`…``` into inline math and a ``.. math::`` paragraph into display math, typeset
  by MathJax in the browser (``docs/js/mathjax.js`` configures it to touch only these elements).
"""

import re

ROLE = re.compile(r":(?:py:)?(?:class|func|meth|attr|data|mod|exc|obj|const):<code>(~?)([^<]+)</code>")
INLINE_MATH = re.compile(r":math:<code>([^<]+)</code>")
DISPLAY_MATH = re.compile(r"<p>\.\. math::\s*(.+?)</p>", re.S)
# ``.. math::``, a blank line, then the indented formula (the reST form): Markdown makes the formula a
# code block after an empty paragraph.
DISPLAY_MATH_BLOCK = re.compile(r"<p>\.\. math::\s*</p>\s*<pre><code>(.+?)</code></pre>", re.S)


def _sub(m: "re.Match") -> str:
    tilde, target = m.groups()
    return f"<code>{target.rsplit('.', 1)[-1] if tilde else target}</code>"


def on_page_content(html, **kwargs):
    html = ROLE.sub(_sub, html)
    html = INLINE_MATH.sub(lambda m: f'<span class="arithmatex">\\({m.group(1)}\\)</span>', html)
    html = DISPLAY_MATH_BLOCK.sub(lambda m: f'<div class="arithmatex">\\[{m.group(1).strip()}\\]</div>', html)
    return DISPLAY_MATH.sub(lambda m: f'<div class="arithmatex">\\[{m.group(1).strip()}\\]</div>', html)
