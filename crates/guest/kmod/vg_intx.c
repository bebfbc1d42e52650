// SPDX-License-Identifier: GPL-2.0 OR BSD-3-Clause
/*
 * vg_intx: the legacy INTx of PCI functions, for a driver in userspace,
 * without binding a kernel driver to them.
 *
 * uio_pci_generic does the same once bound, but the kernel defers binding
 * any driver to a function that the ACPI VIOT puts behind a virtio-iommu
 * until a kernel IOMMU driver for it exists, and here the IOMMU driver is
 * the userspace one. So this module registers a uio device for each
 * function named in `bdfs`, parented to it but binding nothing: a read of
 * /dev/uioN waits for an interrupt, a write of 1 unmasks the line again.
 * The handler masks INTx (the command register's INTx Disable bit) if the
 * function's status says the interrupt is its own, as uio_pci_generic's does.
 */
#include <linux/interrupt.h>
#include <linux/module.h>
#include <linux/pci.h>
#include <linux/slab.h>
#include <linux/uio_driver.h>

#define VG_MAX 4

static char *bdfs[VG_MAX];
static int nbdfs;
module_param_array(bdfs, charp, &nbdfs, 0444);
MODULE_PARM_DESC(bdfs, "PCI functions (DDDD:BB:DD.F) whose INTx to expose");

struct vg_intx {
	struct uio_info info;
	struct pci_dev *pdev;
	bool enabled;
	bool registered;
};

static struct vg_intx *vg[VG_MAX];

static irqreturn_t vg_handler(int irq, struct uio_info *info)
{
	struct vg_intx *v = container_of(info, struct vg_intx, info);

	return pci_check_and_mask_intx(v->pdev) ? IRQ_HANDLED : IRQ_NONE;
}

static int vg_irqcontrol(struct uio_info *info, s32 on)
{
	struct vg_intx *v = container_of(info, struct vg_intx, info);

	pci_intx(v->pdev, !!on);
	return 0;
}

static void vg_release(struct vg_intx *v)
{
	if (v->registered)
		uio_unregister_device(&v->info);
	if (v->enabled)
		pci_disable_device(v->pdev);
	pci_dev_put(v->pdev);
	kfree(v);
}

static int vg_add(const char *name, struct vg_intx **out)
{
	unsigned int domain, bus, slot, fn;
	struct vg_intx *v;
	int err;

	if (sscanf(name, "%x:%x:%x.%x", &domain, &bus, &slot, &fn) != 4)
		return -EINVAL;
	v = kzalloc(sizeof(*v), GFP_KERNEL);
	if (!v)
		return -ENOMEM;
	v->pdev = pci_get_domain_bus_and_slot(domain, bus, PCI_DEVFN(slot, fn));
	if (!v->pdev) {
		kfree(v);
		return -ENODEV;
	}
	/* Routes the INTx pin to an IRQ (the ACPI link), binding nothing. */
	err = pci_enable_device(v->pdev);
	if (err)
		goto fail;
	v->enabled = true;
	err = -ENODEV;
	if (!v->pdev->irq || v->pdev->irq == IRQ_NOTCONNECTED || !pci_intx_mask_supported(v->pdev))
		goto fail;
	v->info.name = "vg_intx";
	v->info.version = "1";
	v->info.irq = v->pdev->irq;
	v->info.irq_flags = IRQF_SHARED;
	v->info.handler = vg_handler;
	v->info.irqcontrol = vg_irqcontrol;
	err = uio_register_device(&v->pdev->dev, &v->info);
	if (err)
		goto fail;
	v->registered = true;
	*out = v;
	return 0;
fail:
	vg_release(v);
	return err;
}

static void vg_remove_all(void)
{
	int i;

	for (i = 0; i < VG_MAX; i++) {
		if (vg[i])
			vg_release(vg[i]);
		vg[i] = NULL;
	}
}

static int __init vg_init(void)
{
	int i, err;

	for (i = 0; i < nbdfs; i++) {
		err = vg_add(bdfs[i], &vg[i]);
		if (err) {
			pr_err("vg_intx: %s: error %d\n", bdfs[i], err);
			vg_remove_all();
			return err;
		}
	}
	return 0;
}

static void __exit vg_exit(void)
{
	vg_remove_all();
}

module_init(vg_init);
module_exit(vg_exit);
MODULE_LICENSE("Dual BSD/GPL");
MODULE_DESCRIPTION("INTx of unbound PCI functions through uio, for viommu's real-guest suite");
