import numpy as np
from scipy.stats import rankdata
def auroc(y, s):
    r = rankdata(s); n1 = y.sum(); n0 = len(y)-n1
    return (r[y==1].sum() - n1*(n1+1)/2)/(n0*n1)
