from regmean.cli import main

main()
