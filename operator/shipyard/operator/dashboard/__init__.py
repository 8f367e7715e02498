"""The rollout dashboard of `kubectl shipyard dashboard`: ``views`` (pure) and ``server`` (aiohttp, I/O).

Needs the ``dashboard`` extra of shipyard-operator (Jinja2, plotly for its bundled plotly.js, aiohttp-sse); the
operator image does not install it.
"""
