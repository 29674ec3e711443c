"""``bridge validate``: a reproducible validation run through the relay, as a user reaches it.

==========  ======================================================================================
``cli``     the command's flags
``runner``  the run: the real ``ollama`` or ``openai`` client, concurrency levels, the environment
``suite``   the versioned prompt suites (``prompts/``)
``stats``   medians and spread
``report``  ``report.md`` and the plots; two runs side by side
==========  ======================================================================================
"""
