"""Coverage-guided fuzz harnesses (atheris / libFuzzer) for Tessera's input boundaries.

Each ``fuzz/fuzz_<name>.py`` is a script (``python fuzz/fuzz_<name>.py -atheris_runs=N``) and
a module: ``test_one_input(data)`` raises only on a real failure (an exception type the code
under test does not document, or a broken invariant); ``seeds()`` gives the starting corpus.
"""
