from memseg_bench.cli import main

main()
