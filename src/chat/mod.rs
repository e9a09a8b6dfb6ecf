//! Talking to instruct models: chat templates ([`ChatTemplate`]) and a model loaded with its
//! tokenizer, template and generation defaults ([`ChatModel`]), which `routelm chat` and
//! `routelm serve` share.

pub mod template;

use std::path::Path;

use candle_core::{DType, Device};

use crate::arch::GenerationDefaults;
use crate::error::Result;
use crate::model::Model;
use crate::tokenize::Tokenizer;

pub use template::{ChatTemplate, Message};

/// What a model without a chat template (a base model, routelm's own) is talked to with:
/// one `role: content` line per message, then `assistant:`.
pub const PLAIN_TEMPLATE: &str = "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}";

/// A model ready to chat: weights, tokenizer, chat template and generation defaults.
pub struct ChatModel {
    pub model: Model,
    pub tok: Tokenizer,
    pub template: ChatTemplate,
    /// Whether the template is the model's own (else [`PLAIN_TEMPLATE`]).
    pub own_template: bool,
    pub defaults: GenerationDefaults,
    /// The ids that end an answer: the model's end-of-sequence ids and its template's
    /// `eos_token`.
    pub stop_ids: Vec<u32>,
    /// Stop strings of the plain template (the next turn's prefix); none for a model's own.
    pub stop_strings: Vec<String>,
}

impl ChatModel {
    /// Load a model folder or GGUF file for chatting.
    pub fn load(path: &Path, lora: Option<&Path>, dtype: DType, device: &Device) -> Result<Self> {
        let model = crate::arch::load_dir_with(path, lora, dtype, device)?.model;
        let tok = Tokenizer::for_model_dir(path)?;
        let defaults = crate::arch::generation_defaults(path)?;
        let (template, own_template) = match ChatTemplate::for_model(path)? {
            Some(t) => (t, true),
            None => (
                ChatTemplate::new(PLAIN_TEMPLATE, Default::default())?,
                false,
            ),
        };
        let mut stop_ids = defaults.eos.clone();
        if let Some(id) = template
            .tokens
            .get("eos_token")
            .and_then(|t| tok.token_id(t))
        {
            if !stop_ids.contains(&id) {
                stop_ids.push(id);
            }
        }
        let stop_strings = if own_template {
            Vec::new()
        } else {
            vec!["\nuser:".into(), "\nsystem:".into()]
        };
        Ok(Self {
            model,
            tok,
            template,
            own_template,
            defaults,
            stop_ids,
            stop_strings,
        })
    }

    /// The token ids of a conversation rendered by the template, ready for the assistant's
    /// answer. The rendered text carries its own special tokens (BOS where the template
    /// writes it), so none are added, as transformers' `apply_chat_template` tokenizes.
    pub fn prompt_ids(
        &self,
        messages: &serde_json::Value,
        extra: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<Vec<u32>> {
        let text = self.template.render_json(messages, true, extra)?;
        self.tok.encode_plain(&text)
    }
}
