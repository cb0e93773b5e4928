from lightning_quant.cli import main

main()
