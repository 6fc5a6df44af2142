from ortho_mecha.cli import console

console()
