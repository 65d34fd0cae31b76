"""Test support, not part of the product: throw-away databases (`testsupport.databases`) and the one
harness that starts, waits for and stops servers (`testsupport.servers`), shared by tests/,
integration_tests/, perf/ and tasks.py.

It lives at the repository root and is not in the wheel (pyproject.toml ships isolation, configurator,
replier and the integration CLI). Everything that uses it runs from a checkout with the root on
`sys.path`: pytest (`pythonpath = ["."]`), `python -m perf...`, `python -c` in nox, and invoke, which
puts the folder of tasks.py first.
"""
