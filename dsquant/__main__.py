from dsquant.cli import main

main()
