"""The MIM model (paper section 5.1): the LightningModule, sharded construction, memory planning, the MIM
directory format and the released checkpoint's conversion.
"""
