"""The samplers and pruners a study can use, by the names the command line offers (a leaf:
`traineval --help` lists them without loading the study's machinery)."""

SAMPLERS = ("tpe", "random", "grid")
PRUNERS = ("median", "halving", "none")
