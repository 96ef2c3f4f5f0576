from med_idefics.cli.app import run_main

run_main()
