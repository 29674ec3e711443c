"""One conformance suite, two relays: the Python relay (``bridge relay``) and the Cloudflare relay
(``deployment/cloudflare`` under ``wrangler dev --local``), driven by the same tests with the same
unchanged Python bridge and real clients."""
